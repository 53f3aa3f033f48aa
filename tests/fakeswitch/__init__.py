"""Tests for the FreeSWITCH emulator (bench/fakeswitch)."""
