"""The Kubernetes API emulator the end-to-end tests run kopf and kubectl against.

`server` holds the emulator (a kmock extension) and the ways to run it; `fixtures` the pytest
fixtures (`kube_api`, `kubectl`, `kopf_operator_subprocess`, `kopf_operator_inprocess`);
`toy_operator` a small kopf operator with its CRD that proves what the real operator relies on.
"""
