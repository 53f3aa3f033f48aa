"""``python -m pipeswitch.bench.emulators``: run the provider emulators standalone."""

from pipeswitch.bench.emulators.runner import main

if __name__ == "__main__":
    main()
