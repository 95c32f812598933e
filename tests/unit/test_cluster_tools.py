"""Unit tests of `cluster.tools`: the helper convention read from `declare -f` output, the
verdict of one node's report, and the command each convention runs.

The helper bodies are bash's own `declare -f` rendering of realistic variants (bash is asked
to render them, so the parser sees exactly what a VM prints)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pgrecovery.cluster import monit, tools
from pgrecovery.cluster.nodes import A9sLayout, Node
from pgrecovery.cluster.tools import Convention, assess, classify_function, parse_declare_f
from pgrecovery.engine.phases import Phase
from pgrecovery.engine.plan import PlanFactory, PlanInputs
from pgrecovery.engine.spec import parse_spec
from pgrecovery.plans.a9s_logical import build_a9s_logical_plan
from pgrecovery.plans.wale_physical import build_wale_physical_plan

ROOT = Path(__file__).resolve().parents[2]

LAYOUT = A9sLayout()

HELPERS = r"""
as_postgres() { chpst -u postgres:vcap "$@"; }
caller() {
    repmgr -f "$REPMGR_CONFIG" primary register --force
}
self_chpst() {
    chpst -u postgres:vcap repmgr -f "$REPMGR_CONFIG" primary register --force
}
self_via_function() {
    echo "registering repmgr primary"
    as_postgres repmgr -f "$REPMGR_CONFIG" primary register --force
}
self_su() { su - postgres -c "repmgr -f $REPMGR_CONFIG primary register --force"; }
self_sudo() { sudo -u postgres /usr/lib/postgresql/15/bin/repmgr primary register --force; }
self_runuser() { runuser -u postgres -- repmgr primary register --force; }
self_bash_c() {
    chpst -u postgres:vcap bash -c 'source "$1"; repmgr primary register; psql -c "select 1"' x y
}
adaptive() {
    if [ "$(id -u)" = 0 ]; then chpst -u postgres:vcap repmgr primary register
    else repmgr primary register; fi
}
external() { /var/vcap/jobs/postgresql-ha/bin/register-primary "$@"; }
external_then_bare() { /var/vcap/jobs/postgresql-ha/bin/register-primary; return; repmgr x; }
mixed() { chpst -u postgres:vcap repmgr primary register --force; psql -c 'select 1'; }
caller_checks_path() { [ -x /usr/bin/repmgr ] || return 1; repmgr primary register; }
sudo_without_user() { sudo repmgr primary register; }
recursive() { recursive; }
"""


@pytest.fixture(scope="module")
def functions() -> dict[str, str]:
    out = subprocess.run(["bash", "-c", HELPERS + "\ndeclare -f"], capture_output=True,
                         text=True, check=True).stdout
    return parse_declare_f(out)


def test_parse_declare_f_finds_every_function(functions: dict[str, str]) -> None:
    assert set(functions) >= {"as_postgres", "caller", "self_chpst", "adaptive", "mixed"}
    assert "primary register --force" in functions["caller"]
    assert "}" not in functions["caller"]


@pytest.mark.parametrize(
    ("name", "convention"),
    [
        ("caller", Convention.CALLER_DROPS),
        ("caller_checks_path", Convention.CALLER_DROPS),
        ("sudo_without_user", Convention.CALLER_DROPS),
        ("self_chpst", Convention.HELPER_DROPS),
        ("self_via_function", Convention.HELPER_DROPS),
        ("self_su", Convention.HELPER_DROPS),
        ("self_sudo", Convention.HELPER_DROPS),
        ("self_runuser", Convention.HELPER_DROPS),
        ("self_bash_c", Convention.HELPER_DROPS),
        ("adaptive", Convention.HELPER_DROPS),
        ("external", None),
        ("external_then_bare", None),
        ("mixed", None),
        ("recursive", None),
        ("not_defined", Convention.HELPER_MISSING),
    ],
)
def test_classify_function(
    functions: dict[str, str], name: str, convention: Convention | None
) -> None:
    verdict = classify_function(functions, name)
    assert verdict.convention is convention, verdict
    assert verdict.evidence


def test_the_simulator_helpers_classify_as_their_convention() -> None:
    from tests.simcluster.render import UTILS, VMFILES  # noqa: PLC0415 - test world

    for convention, file in UTILS.items():
        out = subprocess.run(["bash", "-c", 'source "$1"; declare -f', "x",
                              str(VMFILES / file)], capture_output=True, text=True,
                             check=True).stdout
        verdict = classify_function(parse_declare_f(out), tools.REGISTER_PRIMARY)
        want = {"caller": Convention.CALLER_DROPS, "helper": Convention.HELPER_DROPS}
        assert verdict.convention is want[convention], (file, verdict)


def _report(**overrides: str) -> tools.ToolsReport:
    values = {
        "file:vars": "file", "file:utils": "file", "file:pre-start": "executable",
        "file:roles-sql": "file", "file:monit": "executable", "source:vars": "ok",
        "repmgr-config": LAYOUT.repmgr_config, "repmgr-config-readable": "yes",
        "cmd:repmgr": "/usr/lib/postgresql/15/bin/repmgr", "cmd:psql": "/usr/bin/psql",
        "cmd:chpst": "/usr/bin/chpst", "chpst-postgres": "ok",
        "type:register_master_node": "function",
        "as-postgres:register_master_node": "function",
    }
    values.update(overrides)
    body = "    repmgr -f \"$REPMGR_CONFIG\" primary register --force"
    text = "\n".join(f"{k}\t{v}" for k, v in values.items())
    text += f"\n--- declare -f\nregister_master_node () \n{{ \n{body}\n}}\n"
    return tools.parse_report(text)


SERVICES = monit.parse_summary(
    "Process 'postgresql-ha'   running\nProcess 'repmgr'   running\nSystem 'vm'  running\n"
)


def test_assess_a_good_node() -> None:
    verdict = assess("pg/0", _report(), LAYOUT, monit_services=SERVICES)
    assert verdict.ok, verdict.problems
    assert verdict.convention is Convention.CALLER_DROPS
    assert verdict.monit_services == ("postgresql-ha", "repmgr", "vm")


@pytest.mark.parametrize(
    ("overrides", "services", "words"),
    [
        ({"file:vars": "missing"}, SERVICES, f"pg/0: {LAYOUT.vars_sh} is missing"),
        ({"source:vars": "failed 1"}, SERVICES, "sourcing"),
        ({"file:pre-start": "file"}, SERVICES, f"{LAYOUT.pre_start} is file, not an executable"),
        ({"file:pre-start": "missing"}, SERVICES, f"{LAYOUT.pre_start} is missing"),
        ({"cmd:psql": "-"}, SERVICES, "`psql` is not on the PATH"),
        ({"cmd:chpst": "-"}, SERVICES, "`chpst` is not on the PATH"),
        ({"chpst-postgres": "failed: chpst: fatal: unknown group: vcap"}, SERVICES,
         "unknown group: vcap"),
        ({"repmgr-config-readable": "no"}, SERVICES, "repmgr configuration"),
        ({}, monit.parse_summary("Process 'postgresql'   running\nProcess 'repmgr'  running\n"),
         "monit has no service 'postgresql-ha'"),
        ({"file:utils": "missing", "type:register_master_node": "-", "cmd:repmgr": "-"},
         SERVICES, f"register_master_node not found ({LAYOUT.repmgr_utils_sh} is missing)"),
        ({"as-postgres:register_master_node": "-"}, SERVICES, "as postgres:vcap"),
    ],
)
def test_assess_names_node_path_and_function(
    overrides: dict[str, str], services: dict[str, monit.ServiceStatus], words: str
) -> None:
    verdict = assess("pg/0", _report(**overrides), LAYOUT, monit_services=services)
    assert not verdict.ok
    assert any(words in p for p in verdict.problems), verdict.problems
    assert all(p.startswith("pg/0: ") for p in verdict.problems)


def test_roles_sql_needed_only_for_a_new_site() -> None:
    report = _report(**{"file:roles-sql": "missing"})
    assert assess("pg/0", report, LAYOUT, monit_services=SERVICES).ok
    verdict = assess("pg/0", report, LAYOUT, monit_services=SERVICES, new_site=True)
    assert any("newSite" in p for p in verdict.problems)


def test_missing_helper_falls_back_when_repmgr_can_run() -> None:
    verdict = assess("pg/0", _report(**{"type:register_master_node": "-"}), LAYOUT,
                     monit_services=SERVICES)
    assert verdict.ok, verdict.problems
    assert verdict.convention is Convention.HELPER_MISSING
    assert "does not define it" in verdict.evidence
    assert "repmgr primary register --force -f /x/repmgr.conf" in tools.describe(
        Convention.HELPER_MISSING, "/x/repmgr.conf")


def test_register_argv_per_convention() -> None:
    as_postgres = tools.register_primary_argv(LAYOUT, Convention.CALLER_DROPS)
    assert "exec chpst -u postgres:vcap" in as_postgres[2]
    assert as_postgres[-2:] == [LAYOUT.vars_sh, LAYOUT.repmgr_utils_sh]
    as_root = tools.register_primary_argv(LAYOUT, Convention.HELPER_DROPS)
    assert "chpst" not in as_root[2]
    assert "register_master_node" in as_root[2]
    fallback = tools.register_primary_argv(LAYOUT, Convention.HELPER_MISSING, "/c/repmgr.conf")
    assert "repmgr -f \"$2\" primary register --force" in fallback[2]
    assert fallback[-1] == "/c/repmgr.conf"


@pytest.mark.parametrize(
    ("sample", "factory"),
    [("pgrecovery-s3.yaml", build_a9s_logical_plan),
     ("pgrecovery-wale-pitr.yaml", build_wale_physical_plan)],
)
async def test_the_check_follows_probe_cluster_in_both_plans(
    sample: str, factory: PlanFactory
) -> None:
    doc = yaml.safe_load((ROOT / "manifests/samples" / sample).read_text())
    inputs = PlanInputs(name="r", namespace="ns", uid="u1", spec=parse_spec(doc["spec"]),
                        secrets=None, work_dir="/nonexistent")  # type: ignore[arg-type]
    plan = await factory(inputs)
    names = [s.name for s in plan.steps[Phase.FETCHING]]
    assert names.index("check-cluster-tools") == names.index("probe-cluster") + 1
    assert "ensure-primary-registered" in [s.name for s in plan.steps[Phase.REJOINED]]


class _FakeOps:
    """Records how the plan asks for the registration."""

    def __init__(self) -> None:
        self.calls: list[tuple[Convention | None, str | None]] = []
        self.layout = LAYOUT

    async def ensure_primary_registered(
        self, view: object, convention: Convention | None = None,
        repmgr_config: str | None = None,
    ) -> object:
        from pgrecovery.cluster.a9s import StepResult  # noqa: PLC0415

        self.calls.append((convention, repmgr_config))
        return StepResult("ensure_primary_registered", True, "primary registered: how")


@pytest.mark.parametrize("pinned", [*Convention, None])
async def test_register_step_uses_the_pinned_convention(pinned: Convention | None) -> None:
    """A resumed run calls the helper the way the first run's check decided (or, with a
    status from before the check, lets the primary decide and records it)."""
    from pgrecovery.engine.status import RecoveryStatus  # noqa: PLC0415
    from pgrecovery.engine.steps import StepContext  # noqa: PLC0415
    from pgrecovery.engine.supervisor import MemoryReporter  # noqa: PLC0415
    from pgrecovery.plans.a9s_logical import A9sLogicalRecovery  # noqa: PLC0415

    doc = yaml.safe_load((ROOT / "manifests/samples/pgrecovery-s3.yaml").read_text())
    inputs = PlanInputs(name="r", namespace="ns", uid="u1", spec=parse_spec(doc["spec"]),
                        secrets=None, work_dir="/nonexistent")  # type: ignore[arg-type]
    nodes = tuple(Node(n["name"], n["address"]) for n in doc["spec"]["target"]["nodes"])
    fake = _FakeOps()
    recovery = A9sLogicalRecovery(inputs=inputs, layout=LAYOUT, nodes=nodes,
                                  _ops=fake)  # type: ignore[arg-type]
    facts = {"helperConvention": pinned.value, "repmgrConfig": "/c/repmgr.conf"} if pinned \
        else {}
    status = RecoveryStatus().model_copy(update={"primary": nodes[0].name, "facts": facts})
    reporter = MemoryReporter(status)
    await recovery.register_primary(StepContext(reporter=reporter))
    assert fake.calls == [(pinned, "/c/repmgr.conf" if pinned else None)]
    if pinned is None:
        assert reporter.status.facts["registerPrimaryVia"] == "primary registered: how"
    else:
        assert "registerPrimaryVia" not in reporter.status.facts
