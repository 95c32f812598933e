"""A BOSH director emulator for tests (director.py) over the simulated VMs, its CA (tls.py),
the real bosh CLI built by .ci/build-bosh.sh (cli.py) and their fixtures (fixtures.py)."""
