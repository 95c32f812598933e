"""Test suite: unit (fakes), integration (real servers and simulated VMs), e2e (kopf + API emulator)."""
