"""`ciliumpy operator`: flags checked before anything connects."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from cilium_py.cli import operator as operator_cli
from cilium_py.cli.main import cli


@pytest.mark.parametrize("args, words", [
    (["--cluster-pool-ipv4-cidr", "10.20.0.0/33"], "Invalid value for --cluster-pool-ipv4-cidr: '10.20.0.0/33'"),
    (["--cluster-pool-ipv4-cidr", "10.20.0.1/22"], "has host bits set"),
    (["--cluster-pool-ipv4-cidr", "10.20.0.0/22", "--cluster-pool-ipv4-mask-size", "20"],
     "Invalid value for --cluster-pool-ipv4-mask-size: /20 is shorter than the prefix of the pool CIDR 10.20.0.0/22"),
    (["--cluster-pool-ipv4-cidr", "10.20.0.0/22,10.20.2.0/24"], "10.20.0.0/22 and 10.20.2.0/24 overlap"),
    (["--cluster-pool-ipv4-cidr", "10.20.0.0/22", "--cluster-pool-ipv4-mask-size", "x"],
     "'x' is not a valid integer"),
    (["--leader-election-renew-deadline", "20s"],
     "--leader-election-renew-deadline (20s) must be shorter than --leader-election-lease-duration (15s)"),
    (["--leader-election-lease-duration", "15"], "'15': expected a duration like 10s"),
    (["--identity-heartbeat-timeout", "0"], "'0': must be positive"),
    (["--identity-gc-interval", "-5m"], "'-5m': expected a duration"),
    (["--namespace", ""], "--namespace: must not be empty"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(args, words):
    result = CliRunner().invoke(cli, ["operator", *args])
    assert result.exit_code == 2, result.output
    assert words in result.output


def test_good_flags_make_the_config(monkeypatch):
    seen = {}

    class FakeOperator:   # stands in for the process's main loop, not for the API server
        def __init__(self, kube, config):
            seen["config"] = config

        def run_forever(self):
            pass

    monkeypatch.setattr("cilium_py.operator.app.Operator", FakeOperator)
    monkeypatch.setattr("cilium_py.k8s.client.Kube", lambda *a, **k: type("K", (), {"close": lambda s: None})())
    result = CliRunner().invoke(cli, [
        "operator", "--namespace", "ops", "--cluster-pool-ipv4-cidr", "10.20.0.0/22",
        "--cluster-pool-ipv4-cidr", "10.30.0.0/23", "--cluster-pool-ipv4-mask-size", "25",
        "--leader-election-lease-duration", "4s", "--leader-election-renew-deadline", "3s",
        "--leader-election-retry-period", "500ms", "--identity-gc-interval", "0",
        "--identity-heartbeat-timeout", "1m30s", "--skip-crd-creation"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.namespace == "ops"
    assert [str(c) for c in config.pool.cidrs] == ["10.20.0.0/22", "10.30.0.0/23"]
    assert config.pool.mask_size == 25
    election = config.leader_election
    assert (election.lease_duration, election.renew_deadline, election.retry_period) == (4, 3, 0.5)
    assert (config.identity_gc_interval, config.identity_heartbeat_timeout) == (0, 90)
    assert config.install_crds is False


def test_no_pool_means_no_ipam():
    config = operator_cli.operator_config(
        namespace="kube-system", lease_duration=15, renew_deadline=10, retry_period=2, pool_cidrs=(),
        mask_size=24, gc_interval=900, heartbeat_timeout=1800, install_crds=True)
    assert config.pool is None


def test_help_does_not_import_the_kubernetes_client():
    code = ("import sys; from click.testing import CliRunner; from cilium_py.cli.main import cli; "
            "r = CliRunner().invoke(cli, ['operator', '--help']); assert r.exit_code == 0, r.output; "
            "CliRunner().invoke(cli, ['--help']); print('kubernetes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
