"""netswapd as Prometheus sees it: a real Prometheus server (Debian's `prometheus`) scraping a
real daemon during an nbdcopy run, and the operator material in config/prometheus (alert
rules, Grafana dashboard) checked with promtool and against what the daemon exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support.daemon import REPO, free_port, start_daemon
from support.libnbd import import_libnbd

nbd = import_libnbd()

MiB = 1 << 20
CONFIG = REPO / "config" / "prometheus"
ALERTS = CONFIG / "netswapd-alerts.yml"
DASHBOARD = CONFIG / "netswapd-grafana.json"
# Metrics not exported by netswapd that the operator material may use: Prometheus' own.
PROMETHEUS_METRICS = {"up"}


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition defines, including families with no sample yet
    (a labelled counter nobody incremented still has its # TYPE line)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["_sum", "_count", ""]}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    return names


def referenced_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: the identifiers in front of a {matcher}, and
    any netswap_ name used bare."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return (set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", without_strings))
            | set(re.findall(r"\bnetswap_[a-zA-Z0-9_:]*", without_strings)))


def dashboard_expressions(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    exprs.extend(variable["definition"] for variable in dashboard["templating"]["list"]
                 if variable["type"] == "query")
    return exprs


def as_promql(expr: str) -> str:
    """A Grafana expression as plain PromQL: its variables replaced by what they could be."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def promtool(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def quiet_pressure() -> str:
    """The pressure monitor on, with thresholds this machine never reaches, so its series are
    exported and emergency mode never throttles the test."""
    return ('enabled = true\npsi_enter = 99\npsi_exit = 98\n'
            'available_enter = "1MiB"\navailable_exit = "2MiB"')


# -- the operator material ---------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    check = promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, check.stdout + check.stderr
    # netswapd-alerts.test.yml: the reserve alert fires at 85 % and not at 75 %, drops,
    # refusals, emergency mode and a down daemon fire with the labels an operator routes on.
    unit = subprocess.run(["promtool", "test", "rules", "netswapd-alerts.test.yml"], cwd=CONFIG,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_dashboard_is_valid_json_and_uses_only_exported_metrics(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_expressions(dashboard)
    assert len(exprs) > 20
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("pool", "reserve", "latency", "drops", "refusals", "pressure", "requests"):
        assert topic in titles, topic
    assert any("histogram_quantile" in expr and "netswap_request_duration_seconds_bucket" in expr
               for expr in exprs)

    # Valid PromQL: promtool parses each expression as a recording rule (a rules file in
    # JSON, which is YAML too).
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": as_promql(expr)}
        for i, expr in enumerate(exprs) if not expr.startswith("label_values(")]}]}
    rules_file = tmp_path / "dashboard-rules.json"
    rules_file.write_text(json.dumps(rules))
    check = promtool("check", "rules", str(rules_file))
    assert check.returncode == 0, check.stdout + check.stderr

    # Every metric it selects is one a daemon that served traffic exports.
    daemon = start_daemon(tmp_path, pressure_options=quiet_pressure())
    try:
        h = nbd.NBD()
        h.connect_uri(daemon.uri("swap/dash-node"))
        h.pwrite(b"d" * 65536, 0)
        exported = exported_names(daemon.metrics())
        h.shutdown()
    finally:
        assert daemon.stop() == 0
    missing = {name: expr for expr in exprs for name in referenced_names(expr)
               if name not in exported | PROMETHEUS_METRICS}
    assert not missing, missing


# -- a real Prometheus server ------------------------------------------------------------------


class Prometheus:
    """Debian's prometheus on loopback, scraping the daemon every second, with the alert
    rules loaded."""

    def __init__(self, tmp_path, target_port: int) -> None:
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "netswapd",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        self.log_path = tmp_path / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        self._wait(lambda: self._get("/-/ready", raw=True), "ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def query(self, expr: str) -> list:
        return self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["result"]

    def value(self, expr: str):
        """The single value of `expr` now, or None if it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def rules(self) -> list:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def wait_for(self, what: str, condition, timeout: float = 15):
        return self._wait(condition, what, timeout)

    def _get(self, path: str, raw: bool = False):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as reply:
                body = reply.read()
        except OSError:
            return None  # not up yet
        if raw:
            return body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    def _wait(self, condition, what: str, timeout: float = 15):
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus: not {what}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)


def evaluated(rules: list) -> list:
    """`rules` if the server has evaluated each of them at least once, else []."""
    never = "0001-01-01T00:00:00Z"
    return rules if rules and all(rule["lastEvaluation"] != never for rule in rules) else []


def test_prometheus_scrapes_request_counters_and_reserve_usage_during_nbdcopy(tmp_path):
    # The node stays attached between and after the copies (its series with it) for the grace.
    daemon = start_daemon(tmp_path, swap_size="256MiB", swap_options='detach_grace = "120s"',
                          pressure_options=quiet_pressure())
    source = tmp_path / "source.img"
    block = os.urandom(MiB)  # not zeros: nbdcopy would send those as WRITE_ZEROES
    with open(source, "wb") as f:
        for _ in range(256):
            f.write(block)
    export = "swap/prom-node"
    prometheus = None
    try:
        prometheus = Prometheus(tmp_path, daemon.metrics_port)
        prometheus.wait_for("scraping the daemon", lambda: prometheus.value('up{job="netswapd"}') == 1)

        # A copy of 256 MiB takes about a second here, as long as a scrape interval, so a pass
        # may fall between two scrapes: copy in, out, in, ... until a scrape has seen the
        # copy's connections open (a sample taken during a run), at least once each way.
        passes = {"in": 0, "out": 0}
        deadline = time.monotonic() + 20
        while True:
            direction = "in" if passes["in"] <= passes["out"] else "out"
            source_uri, destination = ((str(source), daemon.uri(export)) if direction == "in"
                                       else (daemon.uri(export), "null:"))
            copy = subprocess.run(["nbdcopy", source_uri, destination], capture_output=True,
                                  text=True, timeout=60)
            assert copy.returncode == 0, copy.stderr
            passes[direction] += 1
            if passes["out"] and prometheus.value("max_over_time(netswap_connections[1m])"):
                break
            assert time.monotonic() < deadline, "no scrape fell inside an nbdcopy run"

        selector = f'export="{export}"'
        prometheus.wait_for(
            "seeing every byte written",
            lambda: prometheus.value(f'sum(netswap_request_bytes_total{{{selector}, op="write"}})')
            == passes["in"] * 256 * MiB)
        assert prometheus.value(f'sum(netswap_requests_total{{{selector}, op="write"}})') > 0
        prometheus.wait_for(
            "seeing every byte read back",
            lambda: prometheus.value(f'sum(netswap_request_bytes_total{{{selector}, op="read"}})')
            == passes["out"] * 256 * MiB)
        # The reserve of the node's groups, scraped while it was attached.
        usage = prometheus.query('netswap_reserve_group_usage_bytes{group=~".*/swap/prom-node/.*"}')
        assert {sample["metric"]["group"] for sample in usage} == {
            "netswapd/nbd/swap/prom-node/requests", "netswapd/nbd/swap/prom-node/windows"}
        assert prometheus.value(
            'netswap_reserve_group_reservation_bytes{group="netswapd/nbd/swap/prom-node/requests"}') > 0
        # The histogram is usable as the dashboard uses it: a finite write p99.
        p99 = prometheus.value('histogram_quantile(0.99, sum by (le) '
                               f'(netswap_request_duration_seconds_bucket{{{selector}, op="write"}}))')
        assert 0 < p99 <= 5
        assert prometheus.value(
            f'netswap_node_swap_used_bytes{{node="prom-node", export="{export}"}}') >= 256 * MiB

        # The alert rules, evaluated by the server against the live series: all healthy, none
        # firing on a daemon that is fine, and every metric they select one the daemon exports.
        rules = prometheus.wait_for("evaluating every rule", lambda: evaluated(prometheus.rules()))
        assert all(rule["health"] == "ok" for rule in rules), rules
        assert not [rule["name"] for rule in rules if rule["state"] == "firing"], rules
        exported = exported_names(daemon.metrics())
        missing = {name: rule["query"] for rule in rules for name in referenced_names(rule["query"])
                   if name not in exported | PROMETHEUS_METRICS}
        assert not missing, missing
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert daemon.stop() == 0
