"""A real Kubernetes API server for the tests: kube-apiserver + etcd built from Go modules.

Why this package exists: the emulator in tests/kubeapi validates no object against the CRD,
evaluates no CEL, prunes nothing and enforces no RBAC. Here the binaries built by
`.ci/build-kube.sh` are started the way controller-runtime's envtest starts them (etcd on
loopback in a temp dir, kube-apiserver with TLS from its own CA, a ServiceAccount issuer and
keys, client-certificate admin, `--authorization-mode=RBAC`, an audit log), once per session.
"""
