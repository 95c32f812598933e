"""The simulated Dingo PostgreSQL cell (owner: the Dingo recovery, issue "Physical recovery").

- `cell.py`: `DingoCell` (one BOSH VM of `SimCluster` with etcd v2, sshd and a `docker`
  stand-in), `Instance` (one solo service instance), `TcpRelay` (S3 for the cell's namespace).
- `cellfiles/`: the files on the cell (docker stand-in, the image's entrypoint and wal-e
  restore side, etcd job).
- `fixtures.py`: session fixture `dingo_cell` (registered in tests/conftest.py).
"""
