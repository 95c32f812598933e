"""`python -m tests.kubeapi --port N`: the emulator as a separate process."""

from tests.kubeapi.server import main

main()
