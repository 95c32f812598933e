"""Preflight of the tools the destructive phases call, and the way to call the job's helpers.

Why this module exists: a cluster built by other hands ran the runbook's
`chpst -u postgres:vcap bash -c 'source vars.sh; source repmgr_utils.sh; register_master_node'`
into `chpst: fatal: unable to setgroups: permission denied` — in Rejoined, long after the
point of no return — because its helper functions drop privileges themselves (each wraps its
repmgr/psql call in `chpst -u postgres:vcap`) and so must be called as root. Both conventions
are plausible for a9s-pg releases. Everything the destructive phases will call is therefore
looked at in Fetching, on every node, read-only, and the convention is *determined* there:

* the helper files exist, and sourcing them (as root, in a subshell, output discarded)
  defines the functions the plan calls (`type -t`);
* each function's body (`declare -f`, following the other functions it calls) is read: a
  privilege drop (`chpst -u`, `su`, `sudo -u`, `runuser`, `setpriv`, `setuidgid`, `gosu`…)
  around its repmgr/psql calls means "the helper drops privileges itself: call it as root";
  bare repmgr/psql calls mean "the caller drops them: call it as postgres" (the runbook's
  text), and for that convention sourcing the helpers *as postgres* must work too; anything
  else (both, or neither, e.g. a call into a script we cannot read) is undetermined and fails
  the check rather than being guessed;
* a missing `register_master_node` is not fatal when the standard command it stands for can
  run: `repmgr primary register --force -f <repmgr config>` (the fallback is recorded);
* monit knows the services by the names the plan uses; repmgr, its configuration, the job's
  `pre-start` (the standbys' re-clone entry point), psql and chpst are where the plan expects
  them, and `chpst -u postgres:vcap` works as root.

The outcome is pinned in status (`helperConvention`), so a resumed run calls the helpers the
same way. Parsing and classification are pure functions (unit-tested); the remote part is one
read-only script per node.
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from pgrecovery.adapters.ssh import RemoteShell, shell_script_argv
from pgrecovery.cluster import monit
from pgrecovery.cluster.nodes import A9sLayout, Node

REGISTER_PRIMARY = "register_master_node"
"""The helper of repmgr_utils.sh that Rejoined calls on the primary (the runbook's)."""

HELPER_FUNCTIONS: tuple[str, ...] = (REGISTER_PRIMARY,)
"""Every helper function a plan calls directly (pre-start calls its own, as the job does)."""


class Convention(enum.StrEnum):
    """How the job's helper functions expect to be called (pinned as `helperConvention`)."""

    CALLER_DROPS = "caller-drops-privileges"
    """Bare repmgr/psql inside: the caller runs them as postgres:vcap (the runbook's text)."""
    HELPER_DROPS = "helper-drops-privileges"
    """The function drops privileges itself (chpst/su/sudo -u/runuser…): call it as root."""
    HELPER_MISSING = "helper-missing"
    """No such function: the standard `repmgr primary register --force` is run instead."""


# Programs that change the user they run their command as.
_DROPPERS = {"chpst", "sudo", "su", "runuser", "setpriv", "setuidgid", "s6-setuidgid", "gosu",
             "su-exec"}
# chpst and sudo only drop privileges with a user option.
_DROPPER_USER_FLAGS = {"chpst": ("-u", "-U"), "sudo": ("-u", "--user")}
# Programs that refuse to run as root or must run as the database owner.
_AS_POSTGRES = {"repmgr", "repmgrd", "psql", "pg_ctl", "pg_basebackup", "initdb", "createdb",
                "createuser", "pg_dump", "pg_dumpall"}
# A segment starting with one of these only mentions a program (a test, a message, a path).
_NOT_A_CALL = {"echo", "printf", "logger", ":", "[", "[[", "test", "command", "type", "which",
               "local", "export", "declare", "readonly", "#", "return", "exit"}
_IDENTITY = re.compile(r"\bid\s+-u\b|\$\{?E?UID\b|\bwhoami\b")
_TOKEN = re.compile(r"[A-Za-z0-9_./:+@-]+")


def parse_declare_f(text: str) -> dict[str, str]:
    """Function name → body from bash's `declare -f` output (`name () ` … `}` at column 0)."""
    functions: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        start = re.fullmatch(r"(\S+) \(\)\s*", line)
        if name is None and start:
            name, body = start.group(1), []
        elif name is not None and line.rstrip() == "}":
            functions[name] = "\n".join(body)
            name = None
        elif name is not None:
            body.append(line)
    return functions


def _segments(body: str) -> list[str]:
    """Simple commands of a body: split on newlines, `;`, `&&`, `||`, `|` and `&` outside
    quotes (a `bash -c '…; …'` stays in the segment of the command that runs it)."""
    segments: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(body):
        c = body[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"' and i + 1 < len(body):
                current.append(c)
                i += 1
                c = body[i]
            current.append(c)
        elif c in "'\"":
            quote = c
            current.append(c)
        elif c in ";|&\n":
            segments.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    segments.append("".join(current))
    return [s.strip() for s in segments if s.strip() and s.strip() not in ("{", "}")]


def _programs(segment: str) -> list[str]:
    """Basenames of the words of a segment (quotes and `$(`/`=` prefixes stripped)."""
    return [tok.rsplit("/", 1)[-1] for tok in _TOKEN.findall(segment)]


def _drops(words: list[str]) -> str | None:
    for i, word in enumerate(words):
        if word not in _DROPPERS:
            continue
        flags = _DROPPER_USER_FLAGS.get(word)
        if flags is None or any(w in flags or w.startswith(("-u", "--user"))
                                for w in words[i + 1:i + 4]):
            return word
    return None


@dataclass(frozen=True)
class Classification:
    """The convention of one helper function, with the lines that decided it."""

    function: str
    convention: Convention | None
    """None: undetermined (both kinds of call, or neither)."""
    evidence: str


@dataclass
class _Calls:
    wrapped: list[str] = field(default_factory=list)
    bare: list[str] = field(default_factory=list)
    identity: bool = False
    drops: bool = False
    """Some command of the function changes user (e.g. `as_postgres() { chpst -u … "$@"; }`)."""
    opaque: list[str] = field(default_factory=list)
    """Calls of the job's own scripts (/var/vcap/…): what they do as whom cannot be read."""


def _calls(functions: dict[str, str], name: str, seen: frozenset[str]) -> _Calls:
    calls = _Calls()
    body = functions.get(name, "")
    calls.identity = bool(_IDENTITY.search(body))
    for segment in _segments(body):
        first = segment.split()[0]
        if first in _NOT_A_CALL or first.startswith("#"):
            continue
        words = _programs(segment)
        program = first.strip("\"'").split("=")[-1]
        if program.startswith("/var/vcap/") and program.rsplit("/", 1)[-1] not in _AS_POSTGRES:
            calls.opaque.append(segment)
        dropper = _drops(words)
        privileged = [w for w in words if w in _AS_POSTGRES]
        callees = [w for w in dict.fromkeys(words) if w in functions and w != name
                   and w not in seen]
        sub = [_calls(functions, callee, seen | {name}) for callee in callees]
        calls.identity = calls.identity or any(s.identity for s in sub)
        calls.drops = calls.drops or bool(dropper) or any(s.drops for s in sub)
        # `as_postgres repmgr …`: a called function that changes user runs the program.
        forwarded = privileged and any(s.drops and not s.bare for s in sub)
        if (dropper and (privileged or any(s.bare or s.wrapped for s in sub))) or forwarded:
            calls.wrapped.append(segment)
            continue
        if privileged:
            calls.bare.append(segment)
        for s in sub:
            calls.wrapped += s.wrapped
            calls.bare += s.bare
            calls.opaque += s.opaque
    return calls


def classify_function(functions: dict[str, str], name: str) -> Classification:
    """Which convention `name` follows, from its body and the functions it calls."""
    if name not in functions:
        return Classification(name, Convention.HELPER_MISSING, f"{name} is not defined")
    calls = _calls(functions, name, frozenset())

    def show(lines: list[str]) -> str:
        return " / ".join(" ".join(line.split())[:120] for line in lines[:2])

    convention: Convention | None = None
    if calls.opaque:
        evidence = f"calls a script of the job whose privileges cannot be read: " \
                   f"{show(calls.opaque)}"
    elif calls.wrapped and not calls.bare:
        convention, evidence = (Convention.HELPER_DROPS,
                                f"drops privileges itself: {show(calls.wrapped)}")
    elif calls.bare and not calls.wrapped:
        convention, evidence = Convention.CALLER_DROPS, f"runs as its caller: {show(calls.bare)}"
    elif calls.wrapped and calls.identity:
        convention, evidence = (Convention.HELPER_DROPS,
                                "checks who runs it and drops privileges when root: "
                                f"{show(calls.wrapped)}")
    elif calls.wrapped:
        evidence = (f"both drops privileges ({show(calls.wrapped)}) and runs bare "
                    f"({show(calls.bare)})")
    else:
        evidence = ("calls neither repmgr/psql nor a privilege drop that can be read in its "
                    f"body: {show(_segments(functions[name]))}")
    return Classification(name, convention, evidence)


# ----------------------------------------------------------------- the remote report

# Read-only. Sourcing happens in subshells with output discarded; nothing is written. The
# keys are parsed by `parse_report`; after `--- declare -f` come the function bodies.
_REPORT = r"""
vars=$1; utils=$2; prestart=$3; cfg=$4; roles=$5; monit=$6; shift 6
emit() { printf '%s\t%s\n' "$1" "$2"; }
kind() { if [ -d "$1" ]; then echo directory; elif [ -x "$1" ]; then echo executable;
         elif [ -f "$1" ]; then echo file; else echo missing; fi; }
emit file:vars "$(kind "$vars")"
emit file:utils "$(kind "$utils")"
emit file:pre-start "$(kind "$prestart")"
emit file:roles-sql "$(kind "$roles")"
emit file:monit "$(kind "$monit")"
(
  set +eu
  if source "$vars" >/dev/null 2>&1 </dev/null; then emit source:vars ok
  else emit source:vars "failed $?"; fi
  config=${REPMGR_CONFIG:-$cfg}
  emit repmgr-config "$config"
  if [ -r "$config" ] && [ -f "$config" ]; then emit repmgr-config-readable yes
  else emit repmgr-config-readable no; fi
  for c in repmgr psql chpst; do emit "cmd:$c" "$(command -v "$c" 2>/dev/null || echo -)"; done
  if command -v chpst >/dev/null 2>&1; then
    out=$(chpst -u postgres:vcap true 2>&1) && emit chpst-postgres ok \
      || emit chpst-postgres "failed: $(printf %s "$out" | head -c 200 | tr '\n\t' '  ')"
  fi
  [ -f "$utils" ] && { source "$utils" >/dev/null 2>&1 </dev/null || true; }
  for f in "$@"; do emit "type:$f" "$(type -t "$f" 2>/dev/null || echo -)"; done
  if [ -f "$utils" ] && command -v chpst >/dev/null 2>&1; then
    for f in "$@"; do
      t=$(chpst -u postgres:vcap bash -c \
          'source "$1" >/dev/null 2>&1 </dev/null; source "$2" >/dev/null 2>&1 </dev/null;
           type -t "$3"' as-postgres "$vars" "$utils" "$f" 2>/dev/null </dev/null)
      emit "as-postgres:$f" "${t:--}"
    done
  fi
  echo "--- declare -f"
  declare -f
)
"""


@dataclass(frozen=True)
class ToolsReport:
    """What the read-only script saw on one node."""

    values: dict[str, str]
    functions: dict[str, str]

    def get(self, key: str) -> str:
        return self.values.get(key, "")


def parse_report(text: str) -> ToolsReport:
    head, _, tail = text.partition("--- declare -f\n")
    values: dict[str, str] = {}
    for line in head.splitlines():
        key, sep, value = line.partition("\t")
        if sep:
            values[key.strip()] = value.strip()
    return ToolsReport(values, parse_declare_f(tail))


def report_argv(layout: A9sLayout, functions: Sequence[str] = HELPER_FUNCTIONS) -> list[str]:
    return shell_script_argv(_REPORT, layout.vars_sh, layout.repmgr_utils_sh, layout.pre_start,
                             layout.repmgr_config, layout.roles_sql, layout.monit, *functions)


@dataclass(frozen=True)
class NodeTools:
    """The verdict for one node: problems (empty = fine) and how to register it as primary."""

    node: str
    problems: tuple[str, ...]
    convention: Convention | None
    evidence: str
    repmgr_config: str
    monit_services: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def assess(
    node: str,
    report: ToolsReport,
    layout: A9sLayout,
    *,
    monit_services: dict[str, monit.ServiceStatus] | None,
    new_site: bool = False,
) -> NodeTools:
    """Check one node's report against what the plan will call. Pure."""
    problems: list[str] = []
    p = problems.append
    vars_kind = report.get("file:vars")
    if vars_kind not in ("file", "executable"):
        p(f"{node}: {layout.vars_sh} is {vars_kind or 'unreadable'} (every psql and repmgr "
          "call sources it)")
    elif report.get("source:vars") != "ok":
        p(f"{node}: sourcing {layout.vars_sh} {report.get('source:vars') or 'did not finish'}")
    if report.get("file:pre-start") != "executable":
        p(f"{node}: {layout.pre_start} is {report.get('file:pre-start') or 'missing'}, not an "
          "executable (Rejoined runs it to re-clone a standby)")
    if report.get("file:monit") != "executable":
        p(f"{node}: {layout.monit} is {report.get('file:monit') or 'missing'}, not an "
          "executable")
    if new_site and report.get("file:roles-sql") not in ("file", "executable"):
        p(f"{node}: {layout.roles_sql} is {report.get('file:roles-sql') or 'missing'} "
          "(spec.target.newSite runs it)")
    for cmd in ("psql", "repmgr", "chpst"):
        if report.get(f"cmd:{cmd}") in ("", "-"):
            p(f"{node}: `{cmd}` is not on the PATH that {layout.vars_sh} sets")
    if report.get("cmd:chpst") not in ("", "-") and report.get("chpst-postgres") != "ok":
        p(f"{node}: `chpst -u postgres:vcap` does not work as root: "
          f"{report.get('chpst-postgres') or 'no answer'}")
    config = report.get("repmgr-config") or layout.repmgr_config
    if report.get("repmgr-config-readable") != "yes":
        p(f"{node}: the repmgr configuration {config} is missing or unreadable "
          "(REPMGR_CONFIG from vars.sh, else the layout's path)")
    services: tuple[str, ...] = ()
    if monit_services is not None:
        services = tuple(monit_services)
        for wanted in (layout.pg_service, layout.repmgr_service):
            if monit.find_service(dict(monit_services), wanted) is None:
                p(f"{node}: monit has no service {wanted!r} (it has {list(services)})")

    utils = report.get("file:utils")
    verdict = classify_function(report.functions, REGISTER_PRIMARY)
    defined = report.get(f"type:{REGISTER_PRIMARY}") == "function"
    convention = verdict.convention if defined else Convention.HELPER_MISSING
    evidence = verdict.evidence
    if not defined:
        where = (f"{layout.repmgr_utils_sh} is {utils}" if utils not in ("file", "executable")
                 else f"{layout.repmgr_utils_sh} does not define it")
        evidence = f"{REGISTER_PRIMARY} not found ({where})"
        if report.get("cmd:repmgr") in ("", "-") or report.get("repmgr-config-readable") != "yes":
            p(f"{node}: {REGISTER_PRIMARY} not found ({where}) and the standard fallback "
              f"`repmgr primary register --force -f {config}` cannot run either")
    elif convention is None:
        p(f"{node}: cannot tell how {REGISTER_PRIMARY} in {layout.repmgr_utils_sh} expects "
          f"to be called: {verdict.evidence}")
    elif convention is Convention.CALLER_DROPS and \
            report.get(f"as-postgres:{REGISTER_PRIMARY}") != "function":
        p(f"{node}: {REGISTER_PRIMARY} runs as its caller, but sourcing {layout.vars_sh} and "
          f"{layout.repmgr_utils_sh} as postgres:vcap does not define it (files unreadable "
          "by postgres?)")
    return NodeTools(node, tuple(problems), convention, evidence, config, services)


def describe(convention: Convention, repmgr_config: str) -> str:
    """How the primary is registered under `convention`, in words (for status)."""
    return {
        Convention.CALLER_DROPS: f"{REGISTER_PRIMARY} called as postgres:vcap (chpst -u "
                                 "postgres:vcap bash -c 'source vars.sh; source "
                                 f"repmgr_utils.sh; {REGISTER_PRIMARY}'), as the runbook reads",
        Convention.HELPER_DROPS: f"{REGISTER_PRIMARY} called as root (it drops privileges "
                                 "itself)",
        Convention.HELPER_MISSING: f"{REGISTER_PRIMARY} not found: fallback `repmgr primary "
                                   f"register --force -f {repmgr_config}` as postgres:vcap",
    }[convention]


# ----------------------------------------------------------------- the remote side

async def inspect_node(
    shell: RemoteShell, node: Node, layout: A9sLayout, *, new_site: bool = False
) -> NodeTools:
    """Run the read-only report and `monit summary` on one node and assess them."""
    res = await shell.run_root(node.endpoint, report_argv(layout), timeout=60, check=False)
    if res.exit_status != 0 and "--- declare -f" not in res.stdout:
        return NodeTools(node.name, (f"{node.name}: the tools check could not run (exit "
                                     f"{res.exit_status}): {res.stderr.strip()[:300]}",),
                         None, "", layout.repmgr_config)
    report = parse_report(res.stdout)
    services: dict[str, monit.ServiceStatus] | None = None
    if report.get("file:monit") == "executable":
        listed = await shell.run_root(node.endpoint, [layout.monit, "summary"], timeout=30,
                                      check=False)
        services = monit.parse_summary(listed.stdout)
    return assess(node.name, report, layout, monit_services=services, new_site=new_site)


# ----------------------------------------------------------------- calling the helper

_REGISTER_AS_POSTGRES = r"""
exec chpst -u postgres:vcap \
  bash -c 'source "$1"; source "$2"; register_master_node;' register "$1" "$2"
"""
_REGISTER_AS_ROOT = r"""
source "$1"; source "$2"; register_master_node
"""
_REGISTER_WITH_REPMGR = r"""
source "$1"
exec chpst -u postgres:vcap repmgr -f "$2" primary register --force
"""


def register_primary_argv(
    layout: A9sLayout, convention: Convention, repmgr_config: str | None = None
) -> list[str]:
    """The root argv registering the node as repmgr primary the way `convention` says."""
    if convention is Convention.CALLER_DROPS:
        return shell_script_argv(_REGISTER_AS_POSTGRES, layout.vars_sh, layout.repmgr_utils_sh)
    if convention is Convention.HELPER_DROPS:
        return shell_script_argv(_REGISTER_AS_ROOT, layout.vars_sh, layout.repmgr_utils_sh)
    return shell_script_argv(_REGISTER_WITH_REPMGR, layout.vars_sh,
                             repmgr_config or layout.repmgr_config)


def summarize(verdicts: Sequence[NodeTools]) -> str:
    """One line for `status.facts.clusterTools`."""
    parts = []
    for v in verdicts:
        conv = v.convention.value if v.convention else "undetermined"
        parts.append(f"{v.node}: {conv}; repmgr config {shlex.quote(v.repmgr_config)}; "
                     f"monit {'/'.join(v.monit_services) or '-'}")
    return "; ".join(parts)
