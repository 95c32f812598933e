"""The Kubernetes API emulator does what kopf, kubectl and the real operator rely on.

Two halves. The first checks API semantics directly over HTTP (fast, no operator): metadata
bookkeeping, the status subresource, generateName, optimistic concurrency, watches resumed from
a resourceVersion, finalizer-aware deletion, selectors, the request log. The second runs the toy
operator (`tests/kubeapi/toy_operator.py`) as a real `kopf run` subprocess or through
`KopfRunner`, driven and observed with the real kubectl: the phase chain through status changes,
the poll pattern with TemporaryError surviving a SIGKILL, finalizers, Events, printer columns,
`kubectl wait`. If these pass, a failure of the real operator's e2e tests is the operator's.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from tests.kubeapi.harness import REPO_ROOT, KubeAPI, Kubectl, log_problems, wait_for
from tests.kubeapi.server import EmulatorThread, fetch_records, write_kubeconfig
from tests.kubeapi.toy_operator import FINALIZER

pytestmark = pytest.mark.e2e
# The fixtures (kube_api, kubectl, kopf_operator_*) come from the top-level conftest.

TOYS = "/apis/toy.pgrecovery.dev/v1"
MODULE = "tests.kubeapi.toy_operator"


def toy(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "toy.pgrecovery.dev/v1", "kind": "Toy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def toy_path(name: str = "", namespace: str = "default", subresource: str = "") -> str:
    path = f"{TOYS}/namespaces/{namespace}/toys"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def merge(api: KubeAPI, path: str, patch: dict[str, Any]) -> tuple[int, Any]:
    return api.request("PATCH", path, patch, content_type="application/merge-patch+json")


def table_rows(output: str) -> list[dict[str, str]]:
    """Parse kubectl's aligned table output by header positions (empty cells are blank)."""
    header, *rows = output.splitlines()
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    names = [header[a:b].strip() for a, b in bounds]
    return [{name: row[a:b].strip() for name, (a, b) in zip(names, bounds, strict=True)}
            for row in rows]


def watch(api: KubeAPI, path: str, **params: str) -> list[dict[str, Any]]:
    """All events of a watch that the server ends itself (pass timeoutSeconds)."""
    query = "&".join(f"{k}={v}" for k, v in {"watch": "true", **params}.items())
    with urllib.request.urlopen(f"{api.url}{path}?{query}", timeout=30) as response:  # noqa: S310
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


# ---------------------------------------------------------------------- API semantics


def test_discovery_lists_crd_resources_with_short_names_and_status(kube_api: KubeAPI) -> None:
    status, namespaces = kube_api.request("GET", "/api/v1/namespaces")
    assert status == 200  # kmock 0.8 answered 500 here
    assert namespaces["kind"] == "NamespaceList"
    assert {"default", "kube-system"} <= {n["metadata"]["name"] for n in namespaces["items"]}

    assert kube_api.request("GET", TOYS)[0] == 404
    kube_api.install_crd()
    status, groups = kube_api.request("GET", "/apis")
    assert "toy.pgrecovery.dev" in [g["name"] for g in groups["groups"]]
    status, resources = kube_api.request("GET", TOYS)
    by_name = {r["name"]: r for r in resources["resources"]}
    assert by_name["toys"]["shortNames"] == ["ty"]
    assert by_name["toys"]["namespaced"] is True
    assert by_name["toys"]["kind"] == "Toy"
    assert by_name["toys/status"]["verbs"] == ["get", "patch", "update"]
    status, crd = kube_api.request(
        "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/toys.toy.pgrecovery.dev")
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"


def test_metadata_generation_and_status_subresource(kube_api: KubeAPI) -> None:
    kube_api.install_crd()
    created = kube_api.create({**toy("t1", mode="idle"), "status": {"phase": "Forged"}})
    meta = created["metadata"]
    assert meta["uid"]
    assert meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert "status" not in created  # dropped on create: status is written through /status

    def current() -> dict[str, Any]:
        return dict(kube_api.request("GET", toy_path("t1"))[1])

    _, after_spec = merge(kube_api, toy_path("t1"), {"spec": {"mode": "chain"}})
    assert after_spec["metadata"]["generation"] == 2
    assert int(after_spec["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])

    _, after_labels = merge(kube_api, toy_path("t1"), {"metadata": {"labels": {"a": "b"}}})
    assert after_labels["metadata"]["generation"] == 2  # metadata does not count

    _, after_status = merge(kube_api, toy_path("t1", subresource="status"),
                            {"status": {"phase": "A"}, "spec": {"mode": "poll"}})
    assert after_status["status"] == {"phase": "A"}
    assert after_status["spec"] == {"mode": "chain"}  # /status changes only status
    assert after_status["metadata"]["generation"] == 2  # status does not count

    _, main_write = merge(kube_api, toy_path("t1"), {"status": {"phase": "Z"}})
    assert main_write["status"] == {"phase": "A"}  # the main resource cannot change status
    assert main_write["metadata"]["resourceVersion"] == after_status["metadata"][
        "resourceVersion"]  # a no-op: no new version

    body = current()
    body["spec"]["mode"] = "idle"
    body["status"] = {"phase": "B"}
    status, replaced = kube_api.request("PUT", toy_path("t1"), body)
    assert status == 200
    assert replaced["spec"] == {"mode": "idle"}
    assert replaced["status"] == {"phase": "A"}
    body = current()
    body["spec"]["mode"] = "poll"
    body["status"] = {"phase": "B"}
    _, replaced = kube_api.request("PUT", toy_path("t1", subresource="status"), body)
    assert replaced["spec"] == {"mode": "idle"}
    assert replaced["status"] == {"phase": "B"}
    assert replaced["metadata"]["generation"] == 3


def test_names_conflicts_and_optimistic_concurrency(kube_api: KubeAPI) -> None:
    kube_api.install_crd()
    event = {"apiVersion": "v1", "kind": "Event", "reason": "R", "message": "m",
             "metadata": {"generateName": "kopf-event-"},
             "involvedObject": {"kind": "Toy", "name": "t1", "namespace": "default"}}
    names = set()
    for _ in range(3):  # kopf names every Event this way: the second one used to be a 409
        status, created = kube_api.request("POST", "/api/v1/namespaces/default/events", event)
        assert status == 201
        names.add(created["metadata"]["name"])
    assert len(names) == 3
    assert all(n.startswith("kopf-event-") for n in names)

    kube_api.create(toy("t1", mode="idle"))
    status, duplicate = kube_api.request("POST", toy_path(), toy("t1"))
    assert (status, duplicate["reason"]) == (409, "AlreadyExists")
    assert kube_api.request("POST", toy_path(namespace="nowhere"),
                            toy("t1", "nowhere"))[0] == 404
    assert kube_api.request("POST", toy_path(), toy("Bad_Name"))[0] == 422

    _, stale = kube_api.request("GET", toy_path("t1"))
    merge(kube_api, toy_path("t1"), {"spec": {"mode": "chain"}})
    status, conflict = kube_api.request("PUT", toy_path("t1"), stale)
    assert (status, conflict["reason"]) == (409, "Conflict")
    del stale["metadata"]["resourceVersion"]
    assert kube_api.request("PUT", toy_path("t1"), stale)[0] == 422  # CRs need a version
    status, _ = kube_api.request(
        "PATCH", toy_path("t1"),
        [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
         {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}],
        content_type="application/json-patch+json")
    assert status == 422  # kopf's finalizer patches rely on this to retry with a fresh body
    assert kube_api.request("PATCH", toy_path("t1"), {"spec": {}},
                            content_type="application/strategic-merge-patch+json")[0] == 415


def test_watch_resumes_from_a_list_and_delivers_every_change(kube_api: KubeAPI) -> None:
    kube_api.install_crd()
    kube_api.create(toy("before", mode="idle"))
    _, listing = kube_api.request("GET", toy_path())
    assert listing["kind"] == "ToyList"
    list_rv = listing["metadata"]["resourceVersion"]

    kube_api.create(toy("t1", mode="idle"))
    merge(kube_api, toy_path("t1"), {"spec": {"mode": "chain"}})
    merge(kube_api, toy_path("t1", subresource="status"), {"status": {"phase": "A"}})
    merge(kube_api, toy_path("t1"), {"spec": {"mode": "chain"}})  # a no-op: no event
    kube_api.request("DELETE", toy_path("t1"))

    events = watch(kube_api, toy_path(), resourceVersion=list_rv, timeoutSeconds="1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "t1"), ("MODIFIED", "t1"), ("MODIFIED", "t1"), ("DELETED", "t1")]
    assert events[2]["object"]["status"] == {"phase": "A"}  # status-only changes are events
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions)
    assert versions[0] > int(list_rv)

    initial = watch(kube_api, toy_path(), timeoutSeconds="1", allowWatchBookmarks="true",
                    sendInitialEvents="true", resourceVersionMatch="NotOlderThan")
    assert [e["type"] for e in initial] == ["ADDED", "BOOKMARK"]
    untouched = watch(kube_api, toy_path(), resourceVersion=list_rv, timeoutSeconds="1",
                      fieldSelector="metadata.name=before")
    assert untouched == []  # kubectl wait/delete watch one object by name like this


def test_watch_from_a_compacted_version_is_gone(tmp_path: Path) -> None:
    with EmulatorThread(history_limit=2) as server:
        api = KubeAPI(server=server, kubeconfig=Path(), directory=tmp_path)
        for name in ("a", "b", "c", "d"):
            api.create_namespace(name)
        events = watch(api, "/api/v1/namespaces", resourceVersion="2", timeoutSeconds="1")
        assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]


def test_bookmarks_are_sent_on_silent_watches(tmp_path: Path) -> None:
    with EmulatorThread(bookmark_interval=0.2) as server:
        api = KubeAPI(server=server, kubeconfig=Path(), directory=tmp_path)
        events = watch(api, "/api/v1/namespaces", resourceVersion="1", timeoutSeconds="1",
                       allowWatchBookmarks="true")
        assert len(events) >= 2
        assert {e["type"] for e in events} == {"BOOKMARK"}


def test_deletion_waits_for_finalizers(kube_api: KubeAPI) -> None:
    kube_api.install_crd()
    kube_api.create({**toy("t1", mode="idle"),
                     "metadata": {"name": "t1", "namespace": "default",
                                  "finalizers": ["example.com/keep"]}})
    status, deleting = kube_api.request("DELETE", toy_path("t1"))
    assert status == 200
    assert deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["generation"] == 2  # a real server bumps it on deletion
    assert kube_api.request("GET", toy_path("t1"))[0] == 200
    status, refused = merge(kube_api, toy_path("t1"),
                            {"metadata": {"finalizers": ["example.com/keep", "new/one"]}})
    assert status == 422, refused
    status, released = merge(kube_api, toy_path("t1"), {"metadata": {"finalizers": None}})
    assert status == 200
    assert released["metadata"]["name"] == "t1"
    assert kube_api.request("GET", toy_path("t1"))[0] == 404

    kube_api.create_namespace("doomed")
    kube_api.create(toy("inside", "doomed", mode="idle"))
    assert kube_api.request("DELETE", "/api/v1/namespaces/doomed")[0] == 200
    assert kube_api.request("GET", toy_path("inside", "doomed"))[0] == 404
    assert kube_api.request("GET", "/api/v1/namespaces/doomed")[0] == 404


def test_label_and_field_selectors(kube_api: KubeAPI) -> None:
    kube_api.install_crd()
    for name, tier in (("a", "gold"), ("b", "silver"), ("c", None)):
        obj = toy(name, mode="idle")
        if tier:
            obj["metadata"]["labels"] = {"tier": tier}
        kube_api.create(obj)

    def names(**params: str) -> list[str]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        status, listing = kube_api.request("GET", f"{toy_path()}?{query}")
        assert status == 200, listing
        return [item["metadata"]["name"] for item in listing["items"]]

    assert names(labelSelector="tier=gold") == ["a"]
    assert names(labelSelector="tier") == ["a", "b"]
    assert names(labelSelector="!tier") == ["c"]
    assert names(labelSelector="tier%20in%20(gold,silver)") == ["a", "b"]
    assert names(labelSelector="tier!=gold") == ["b", "c"]
    assert names(fieldSelector="metadata.name=b") == ["b"]
    assert names(fieldSelector="metadata.namespace!=default") == []
    assert kube_api.request("GET", f"{toy_path()}?fieldSelector=spec.mode=idle")[0] == 400
    assert names(limit="2") == ["a", "b"]  # the first page of kubectl's chunked listing


def test_every_request_is_recorded_for_rbac_checks(kube_api: KubeAPI) -> None:
    kube_api.install_crd()
    mark = kube_api.mark()
    kube_api.create(toy("t1", mode="idle"))
    kube_api.request("GET", toy_path(), user="operator")
    merge(kube_api, toy_path("t1", subresource="status"), {"status": {"phase": "A"}})
    watch(kube_api, toy_path(), timeoutSeconds="0.1")
    kube_api.request("DELETE", toy_path("t1"))
    kube_api.request("GET", "/api/v1/namespaces/default/secrets/missing")
    api_calls = [r for r in kube_api.records(since=mark) if r.resource]  # not discovery
    assert [r.rbac() for r in api_calls] == [
        ("create", "toy.pgrecovery.dev", "toys", None, "default"),
        ("list", "toy.pgrecovery.dev", "toys", None, "default"),
        ("patch", "toy.pgrecovery.dev", "toys", "status", "default"),
        ("watch", "toy.pgrecovery.dev", "toys", None, "default"),
        ("delete", "toy.pgrecovery.dev", "toys", None, "default"),
        ("get", "", "secrets", None, "default"),
    ]
    assert [r.status for r in api_calls] == [201, 200, 200, 200, 200, 404]
    assert [r.user for r in kube_api.records(since=mark, verb="list")] == ["operator"]
    with urllib.request.urlopen(f"{kube_api.url}/_emulator/requests") as response:  # noqa: S310
        remote = json.loads(response.read())["items"]
    assert remote[-1]["resource"] == "secrets"
    assert remote[-1]["status"] == 404


def test_kmock_reactions_inject_faults(kube_api: KubeAPI) -> None:
    kube_api.emulator[kmock.method.GET, kmock.resource("v1/secrets")] << 503
    assert kube_api.request("GET", "/api/v1/namespaces/default/secrets")[0] == 503
    assert kube_api.request("GET", "/api/v1/namespaces/default/configmaps")[0] == 200


def test_runs_as_a_separate_process(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "subprocess-kubeconfig"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.kubeapi", "--port", "0", "--kubeconfig", str(kubeconfig)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("KUBEAPI_URL=http://127.0.0.1:")
        remote = Kubectl(kubeconfig=kubeconfig, cache_dir=tmp_path / "cache")
        result = remote.get("namespaces")
        assert result.returncode == 0, result.stderr
        assert "kube-system" in result.stdout
        url = line.strip().removeprefix("KUBEAPI_URL=")
        lists = [r for r in fetch_records(url) if r.rbac() == ("list", "", "namespaces", None,
                                                               None)]
        # kubectl sends no bearer token over plain HTTP; its user agent tells it apart.
        assert [(r.user, r.status) for r in lists] == [("system:anonymous", 200)]
        assert lists[0].user_agent.startswith("kubectl/")
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_kubeconfig_can_be_written_for_any_url(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:1", user="ops", namespace="x")
    config = yaml.safe_load(path.read_text())
    assert config["users"][0]["user"]["token"] == "ops"
    assert config["contexts"][0]["context"]["namespace"] == "x"


# ---------------------------------------------------------------------- kubectl


def test_kubectl_apply_get_wait_delete_against_the_emulator(kube_api: KubeAPI,
                                                            kubectl: Kubectl) -> None:
    crd = kubectl("apply", "-f", str(REPO_ROOT / "tests/kubeapi/toy_crd.yaml"))
    assert crd.returncode == 0, crd.stderr
    assert kubectl.wait("--for=condition=Established",
                        "crd/toys.toy.pgrecovery.dev", "--timeout=10s").returncode == 0
    explained = kubectl("explain", "toy.spec")
    assert "What the toy operator should do" in explained.stdout, explained.stderr
    manifest = yaml.safe_dump(toy("t1", mode="idle"))
    first = kubectl.apply(manifest)
    assert first.returncode == 0
    assert "created" in first.stdout, first.stderr
    again = kubectl.apply(yaml.safe_dump(toy("t1", mode="chain")))
    assert again.returncode == 0
    assert "configured" in again.stdout, again.stderr
    applied = kubectl.json("toy", "t1")
    assert applied["spec"]["mode"] == "chain"
    assert "kubectl.kubernetes.io/last-applied-configuration" in applied["metadata"][
        "annotations"]
    assert applied["metadata"]["generation"] == 2

    result = kubectl("patch", "ty", "t1", "--subresource=status", "--type=merge", "-p",
                     json.dumps({"status": {"phase": "C", "pollAttempts": 2, "conditions": [
                         {"type": "Done", "status": "True"}]}}))
    assert result.returncode == 0, result.stderr
    table = kubectl.get("ty")
    assert table.returncode == 0, table.stderr
    (row,) = table_rows(table.stdout)
    assert list(row) == ["NAME", "PHASE", "POLLS", "DONE", "AGE"]
    assert [row["NAME"], row["PHASE"], row["POLLS"], row["DONE"]] == ["t1", "C", "2", "True"]
    assert row["AGE"].endswith("s")
    assert kubectl.wait("--for=condition=Done", "toy/t1", "--timeout=5s").returncode == 0
    assert kubectl.wait("--for=jsonpath={.status.phase}=C", "toy/t1",
                        "--timeout=5s").returncode == 0
    assert kubectl.wait("--for=jsonpath={.status.phase}=D", "toy/t1",
                        "--timeout=1s").returncode != 0

    secret = kubectl.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret",
                                           "metadata": {"name": "key"},
                                           "stringData": {"key": "s3cret"}}))
    assert secret.returncode == 0, secret.stderr
    assert kubectl.json("secret", "key")["data"] == {"key": "czNjcmV0"}
    created = kubectl("create", "secret", "generic", "ssh", "--from-literal=user=vcap")
    assert created.returncode == 0, created.stderr  # a protobuf body, unlike apply
    assert kubectl.json("secret", "ssh")["data"] == {"user": "dmNhcA=="}
    deleted = kubectl.delete("toy", "t1", "--timeout=10s")
    assert deleted.returncode == 0, deleted.stderr
    missing = kubectl.get("toy", "t1")
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr


# ---------------------------------------------------------------------- kopf


@pytest.fixture
def toy_namespace(kube_api: KubeAPI, kubectl: Kubectl) -> str:
    """The toy CRD installed with kubectl, and a namespace for the operator to serve."""
    assert kubectl("apply", "-f", str(REPO_ROOT / "tests/kubeapi/toy_crd.yaml")).returncode == 0
    kube_api.create_namespace("toys")
    kubectl.namespace = "toys"
    return "toys"


def status_of(kube_api: KubeAPI, name: str, namespace: str) -> dict[str, Any]:
    obj = kube_api.get_object("toy.pgrecovery.dev", "toys", namespace, name) or {}
    return dict(obj.get("status") or {})


def event_messages(kubectl: Kubectl, name: str) -> list[str]:
    events = kubectl.json("events", "--field-selector", f"involvedObject.name={name}")
    return [e["message"] for e in events["items"]]


def test_status_changes_chain_phase_handlers(kube_api: KubeAPI, kubectl: Kubectl,
                                             toy_namespace: str, kopf_operator_subprocess: Any,
                                             ) -> None:
    operator = kopf_operator_subprocess(MODULE, namespace=toy_namespace, watching=["toys"])
    assert kubectl.apply(yaml.safe_dump(toy("chain", toy_namespace, mode="chain"))
                         ).returncode == 0
    assert kubectl.apply(yaml.safe_dump(toy("idle", toy_namespace, mode="idle"))).returncode == 0

    done = kubectl.wait("--for=condition=Done", "toy/chain", "--timeout=30s")
    assert done.returncode == 0, (done.stderr, operator.log_text()[-3000:])
    assert status_of(kube_api, "chain", toy_namespace)["phase"] == "C"
    assert kubectl.wait("--for=condition=Done", "toy/idle", "--timeout=2s").returncode != 0

    wait_for(lambda: len(event_messages(kubectl, "chain")) >= 4, timeout=10,
             message="the four phase Events")
    assert sorted(event_messages(kubectl, "chain")) == [
        "A done, entered phase B", "B done, entered phase C", "C done", "entered phase A"]
    table = kubectl.get("events")
    assert table.returncode == 0, table.stderr
    assert "toy/chain" in table.stdout
    assert "entered phase A" in table.stdout
    (row,) = table_rows(kubectl.get("ty", "chain").stdout)
    assert (row["PHASE"], row["POLLS"], row["DONE"]) == ("C", "", "True")
    described = kubectl("describe", "toy", "chain")
    assert "entered phase A" in described.stdout  # kopf's Events reference the object's uid
    assert log_problems(operator.log_text()) == []

    # The operator only used the API in ways a Role can allow; no emulator errors either.
    verbs = {(r.verb, r.resource, r.subresource) for r in kube_api.records(user=operator.user)}
    assert ("patch", "toys", "status") in verbs
    assert ("create", "events", None) in verbs
    assert not [r for r in kube_api.records(user=operator.user) if r.status >= 500]


@pytest.mark.parametrize("kube_api_options", [{"watch_timeout": 0.5}])
def test_kopf_resumes_watches_the_server_ends(kube_api: KubeAPI, kubectl: Kubectl,
                                              toy_namespace: str,
                                              kopf_operator_subprocess: Any) -> None:
    # A real server ends every watch after a while; kopf must resume from the last version
    # it saw without losing the changes in between.
    operator = kopf_operator_subprocess(MODULE, namespace=toy_namespace, watching=["toys"])
    for index in range(3):
        assert kubectl.apply(yaml.safe_dump(toy(f"chain-{index}", toy_namespace, mode="chain"))
                             ).returncode == 0
        time.sleep(0.4)
    for index in range(3):
        done = kubectl.wait("--for=condition=Done", f"toy/chain-{index}", "--timeout=30s")
        assert done.returncode == 0, (done.stderr, operator.log_text()[-3000:])
    watches = kube_api.records(user=operator.user, verb="watch", resource="toys")
    assert len(watches) >= 4  # the server ended them; kopf came back each time
    versions = [int(w.params["resourceVersion"]) for w in watches]
    assert versions == sorted(versions)
    assert versions[-1] > versions[0]  # resumed from what it had seen, not re-listed
    assert log_problems(operator.log_text()) == []


@pytest.mark.parametrize("kube_api_options", [{"watch_timeout": 0.5, "history_limit": 3}])
def test_kopf_relists_when_its_version_is_compacted(kube_api: KubeAPI, kubectl: Kubectl,
                                                   toy_namespace: str,
                                                   kopf_operator_subprocess: Any) -> None:
    # The 410 Gone path: while kopf reconnects, other writes push its last version out of the
    # (tiny) history; kopf must list again and still see every toy.
    operator = kopf_operator_subprocess(MODULE, namespace=toy_namespace, watching=["toys"])
    for index in range(5):
        kube_api.create({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": f"noise-{index}", "namespace": toy_namespace}})
    wait_for(lambda: len(kube_api.records(user=operator.user, verb="list",
                                          resource="toys")) >= 2,
             timeout=10, message="kopf to list toys again after 410")
    assert kubectl.apply(yaml.safe_dump(toy("chain", toy_namespace, mode="chain"))
                         ).returncode == 0
    done = kubectl.wait("--for=condition=Done", "toy/chain", "--timeout=30s")
    assert done.returncode == 0, (done.stderr, operator.log_text()[-3000:])
    assert log_problems(operator.log_text()) == []


def test_temporary_errors_poll_until_done_inprocess(kube_api: KubeAPI, kubectl: Kubectl,
                                                   toy_namespace: str,
                                                   kopf_operator_inprocess: Any) -> None:
    operator = kopf_operator_inprocess(MODULE, namespace=toy_namespace, watching=["toys"])
    assert kubectl.apply(yaml.safe_dump(toy("poller", toy_namespace, mode="poll", polls=3))
                         ).returncode == 0
    result = kubectl.wait("--for=condition=Done", "toy/poller", "--timeout=30s")
    assert result.returncode == 0, result.stderr
    status = status_of(kube_api, "poller", toy_namespace)
    assert status["phase"] == "Polled"
    assert status["pollAttempts"] == 3
    assert [entry.split("@")[0] for entry in status["pollLog"]] == ["1", "2", "3"]
    polls = [m for m in event_messages(kubectl, "poller") if m.startswith("poll attempt")]
    assert sorted(polls) == ["poll attempt 1/3", "poll attempt 2/3", "poll attempt 3/3"]
    operator.stop()
    assert "Handler 'poll' failed temporarily" in operator.output
    # In a thread kopf cannot install signal handlers and says so; nothing else may go wrong.
    assert log_problems(operator.output, allowed=("failed temporarily",
                                                  "OS signals are ignored")) == []


def test_unfinished_handler_resumes_after_sigkill(kube_api: KubeAPI, kubectl: Kubectl,
                                                 toy_namespace: str,
                                                 kopf_operator_subprocess: Any) -> None:
    operator = kopf_operator_subprocess(MODULE, namespace=toy_namespace, watching=["toys"])
    assert kubectl.apply(yaml.safe_dump(toy("poller", toy_namespace, mode="poll", polls=6))
                         ).returncode == 0
    wait_for(lambda: status_of(kube_api, "poller", toy_namespace).get("pollAttempts", 0) >= 2,
             timeout=30, message="two poll attempts")
    first_pid = operator.pid
    operator.kill()
    frozen = status_of(kube_api, "poller", toy_namespace)
    time.sleep(2.5)  # nobody polls while the operator is dead
    assert status_of(kube_api, "poller", toy_namespace) == frozen
    assert frozen["phase"] == "Polling"

    operator.start()
    result = kubectl.wait("--for=condition=Done", "toy/poller", "--timeout=60s")
    assert result.returncode == 0, (result.stderr, operator.log_text()[-3000:])
    log = [(int(attempt), int(pid)) for attempt, pid in
           (entry.split("@") for entry in status_of(kube_api, "poller", toy_namespace)[
               "pollLog"])]
    attempts = [attempt for attempt, _ in log]
    assert attempts == sorted(attempts)
    assert attempts[-1] == 6
    resumed = [attempt for attempt, pid in log if pid == operator.pid]
    assert resumed  # the retry count survived the SIGKILL
    assert resumed[0] > 1
    assert {pid for _, pid in log} == {first_pid, operator.pid}
    assert log_problems(operator.log_text()) == []


def test_finalizer_blocks_deletion_until_the_operator_releases_it(
        kube_api: KubeAPI, kubectl: Kubectl, toy_namespace: str,
        kopf_operator_subprocess: Any) -> None:
    operator = kopf_operator_subprocess(MODULE, namespace=toy_namespace, watching=["toys"])

    def finalizers(name: str) -> list[str]:
        obj = kube_api.get_object("toy.pgrecovery.dev", "toys", toy_namespace, name) or {}
        return list(obj.get("metadata", {}).get("finalizers") or [])

    for name in ("doomed", "stuck"):
        assert kubectl.apply(yaml.safe_dump(toy(name, toy_namespace, mode="idle"))
                             ).returncode == 0
    for name in ("doomed", "stuck"):
        wait_for(functools.partial(lambda n: FINALIZER in finalizers(n), name), timeout=30,
                 message=f"the operator's finalizer on {name}")

    # With the operator running, `kubectl delete` returns once the delete handler has run.
    deleted = kubectl.delete("toy", "doomed", "--timeout=30s")
    assert deleted.returncode == 0, (deleted.stderr, operator.log_text()[-3000:])
    assert kube_api.get_object("toy.pgrecovery.dev", "toys", toy_namespace, "doomed") is None
    assert "released the finalizer" in event_messages(kubectl, "doomed")

    # Without it, the object waits in deletion until an operator comes back.
    operator.stop()
    assert kubectl.delete("toy", "stuck", "--wait=false").returncode == 0
    stuck = kube_api.get_object("toy.pgrecovery.dev", "toys", toy_namespace, "stuck")
    assert stuck is not None
    assert stuck["metadata"]["deletionTimestamp"]
    operator.start()
    gone = kubectl.wait("--for=delete", "toy/stuck", "--timeout=30s")
    assert gone.returncode == 0, (gone.stderr, operator.log_text()[-3000:])
    assert "released the finalizer" in event_messages(kubectl, "stuck")
    assert log_problems(operator.log_text()) == []
