"""Test suite: unit (fakes), integration (real servers, simulated VMs), e2e (kopf + emulator)."""
