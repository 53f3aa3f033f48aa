"""``python -m bench.emulators``: run the provider emulators standalone."""

from bench.emulators.runner import main

if __name__ == "__main__":
    main()
