"""The manifests a user applies to install ciliumpy (operator/*.yaml): valid YAML of known
kinds, roles granting exactly what cilium_py/k8s/rbac.py says each component needs, and
workloads whose commands, options (flags, the ConfigMap's config file, the environment) and
probes the real CLI accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click
import pytest
import yaml

from cilium_py.k8s import rbac
from cilium_py.k8s.resources import WATCHED_KINDS

MANIFESTS = Path(__file__).resolve().parents[2] / "operator"
KNOWN_KINDS = {
    ("v1", "ServiceAccount"), ("v1", "ConfigMap"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"), ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apps/v1", "DaemonSet"), ("apps/v1", "Deployment"),
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}


def load_manifests() -> dict[tuple[str, str, str], dict]:
    """Every document of operator/*.yaml by (kind, namespace, name)."""
    objects: dict[tuple[str, str, str], dict] = {}
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert files, f"no manifests in {MANIFESTS}"
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            where = f"{path.name} document {i + 1}"
            if doc is None:
                continue
            assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, \
                f"{where}: unexpected {doc.get('apiVersion')} {doc.get('kind')}"
            meta = doc.get("metadata") or {}
            assert meta.get("name"), f"{where}: no metadata.name"
            if doc["kind"] in CLUSTER_SCOPED:
                assert "namespace" not in meta, f"{where}: a {doc['kind']} has no namespace"
            else:
                assert meta.get("namespace") == rbac.NAMESPACE, f"{where}: not in {rbac.NAMESPACE}"
            key = (doc["kind"], meta.get("namespace", ""), meta["name"])
            assert key not in objects, f"{where}: {key} defined twice"
            objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def manifests():
    return load_manifests()


def _one(manifests, kind: str, name: str, namespace: str = "") -> dict:
    key = (kind, namespace, name)
    assert key in manifests, f"operator/ has no {kind} {namespace + '/' if namespace else ''}{name}"
    return manifests[key]


def _compare(granted: set, wanted: set, what: str, accesses) -> None:
    missing, extra = sorted(wanted - granted), sorted(granted - wanted)
    assert not missing and not extra, (
        f"{what} differs from cilium_py/k8s/rbac.py: missing {missing}, not in the table {extra}; "
        f"rules granting the table:\n{yaml.safe_dump(rbac.rules(accesses), sort_keys=False)}")


@pytest.mark.parametrize("component", rbac.COMPONENTS, ids=lambda c: c.service_account)
def test_roles_grant_exactly_the_table(manifests, component):
    sa, ns = component.service_account, component.namespace
    _one(manifests, "ServiceAccount", sa, ns)
    role = _one(manifests, "ClusterRole", sa)
    _compare(rbac.rule_grants(role["rules"], f"ClusterRole {sa}"), rbac.grants(component.cluster),
             f"ClusterRole {sa}", component.cluster)
    binding = _one(manifests, "ClusterRoleBinding", sa)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sa}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    if component.namespaced:
        role = _one(manifests, "Role", sa, ns)
        _compare(rbac.rule_grants(role["rules"], f"Role {ns}/{sa}"), rbac.grants(component.namespaced),
                 f"Role {ns}/{sa}", component.namespaced)
        binding = _one(manifests, "RoleBinding", sa, ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    else:
        assert ("Role", ns, sa) not in manifests


def test_no_other_roles_or_bindings(manifests):
    """Every role belongs to a component of the table: nothing is granted beside it."""
    names = {c.service_account for c in rbac.COMPONENTS}
    for kind, _, name in manifests:
        if kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            assert name in names, f"{kind} {name} is not a component of cilium_py/k8s/rbac.py"


def test_rule_grants_refuses_wildcards_and_url_rules():
    with pytest.raises(ValueError, match=r"rules\[0\]: verbs has a wildcard"):
        rbac.rule_grants([{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}])
    with pytest.raises(ValueError, match=r"rules\[1\]: resources is missing"):
        rbac.rule_grants([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                          {"apiGroups": [""], "verbs": ["get"]}])
    with pytest.raises(ValueError, match="nonResourceURLs"):
        rbac.rule_grants([{"nonResourceURLs": ["/healthz"], "verbs": ["get"]}])


def test_table_entries_are_checked():
    with pytest.raises(KeyError, match="unknown Kubernetes kind 'Secret'"):
        rbac.Access("Secret", ("get",), "no")
    with pytest.raises(ValueError, match="unknown verb"):
        rbac.Access("Pod", ("read",), "no")
    with pytest.raises(ValueError, match="resourceNames"):
        rbac.Access("Lease", ("create",), "no", names=("x",))


def test_agent_watches_every_kind_its_source_watches():
    granted = rbac.grants(rbac.AGENT.cluster)
    for kind in WATCHED_KINDS:
        a = rbac.Access(kind, ("list",), "")
        assert {(a.group, a.resource, v, "") for v in ("list", "watch")} <= granted, kind


def test_rules_render_the_table_exactly():
    for component in rbac.COMPONENTS:
        for accesses in (component.cluster, component.namespaced):
            assert rbac.rule_grants(rbac.rules(accesses)) == rbac.grants(accesses)


# -- workloads -------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _container_env(container: dict, sample: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet would set it: fieldRefs from `sample`,
    $(VAR) references to variables defined before them expanded (an undefined one would be
    left as it is: refused here), optional ConfigMap keys that are absent left out."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            value = var["value"]
            for ref in _ENV_REF.findall(value):
                assert ref in env, f"env {name} refers to $({ref}), which is not defined before it"
            env[name] = _ENV_REF.sub(lambda m: env[m.group(1)], value)
        else:
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = sample[source["fieldRef"]["fieldPath"]]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = sample.get(f"configmap:{ref['name']}:{ref['key']}")
                if value is None:
                    assert ref.get("optional"), f"env {name}: ConfigMap key {ref['key']} is missing"
                else:
                    env[name] = value
            else:
                raise AssertionError(f"env {name}: unexpected source {source}")
    return env


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        for ref in _ENV_REF.findall(arg):
            assert ref in env, f"argument {arg!r} refers to $({ref}), which the container does not define"
        out.append(_ENV_REF.sub(lambda m: env[m.group(1)], arg))
    return out


def parse_ciliumpy(argv: list[str], env: dict[str, str], monkeypatch) -> click.Context:
    """Parses a `ciliumpy ...` command line as the real CLI does (types, choices, required
    options, the --config file's keys), with exactly `env` as the CILIUMPY_* environment,
    without running the command. Raises click's error naming the offending option."""
    from cilium_py.cli.main import cli

    assert argv[0] == "ciliumpy", f"not a ciliumpy command: {argv}"
    for name in [n for n in os.environ if n.startswith("CILIUMPY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command, rest, path = cli, argv[1:], ["ciliumpy"]
    while isinstance(command, click.Group):
        assert rest, f"{' '.join(path)} needs a subcommand"
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"{' '.join(path)} has no command {rest[0]!r}"
        command, rest, path = sub, rest[1:], path + [rest[0]]
    return command.make_context(" ".join(path), list(rest))


def _config_arg(args: list[str], container: dict, pod: dict, manifests, tmp_path) -> list[str]:
    """The args with --config pointing at the ConfigMap's file as the container would see it."""
    out = []
    for arg in args:
        if not arg.startswith("--config="):
            out.append(arg)
            continue
        path = arg.split("=", 1)[1]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
        directory, _, key = path.rpartition("/")
        assert directory in mounts, f"--config {path}: nothing mounted at {directory}"
        volume = {v["name"]: v for v in pod["volumes"]}[mounts[directory]]
        assert "configMap" in volume, f"--config {path}: {directory} is not a ConfigMap"
        config_map = _one(manifests, "ConfigMap", volume["configMap"]["name"], rbac.NAMESPACE)
        assert key in config_map["data"], f"ConfigMap {config_map['metadata']['name']} has no key {key}"
        local = tmp_path / key
        local.write_text(config_map["data"][key])
        out.append(f"--config={local}")
    return out


SAMPLE_POD = {"spec.nodeName": "node-1", "metadata.namespace": rbac.NAMESPACE}


def _check_container(manifests, pod: dict, container: dict, tmp_path, monkeypatch) -> click.Context:
    env = _container_env(container, SAMPLE_POD)
    argv = container["command"] + _expand(container.get("args") or [], env)
    ctx = parse_ciliumpy(_config_arg(argv, container, pod, manifests, tmp_path), env, monkeypatch)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container:
            parse_ciliumpy(container[probe]["exec"]["command"], env, monkeypatch)
    mounts = {m["name"] for m in container.get("volumeMounts") or []}
    volumes = {v["name"] for v in pod.get("volumes") or []}
    assert mounts <= volumes, f"mounts without volumes: {sorted(mounts - volumes)}"
    return ctx


def test_agent_daemonset(manifests, tmp_path, monkeypatch):
    ds = _one(manifests, "DaemonSet", "ciliumpy", rbac.NAMESPACE)
    assert ds["metadata"]["labels"]["k8s-app"] == "ciliumpy"
    assert ds["spec"]["selector"]["matchLabels"] == {"k8s-app": "ciliumpy"}
    assert ds["spec"]["template"]["metadata"]["labels"]["k8s-app"] == "ciliumpy"
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == rbac.AGENT.service_account
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    [container] = pod["containers"]
    assert container["command"] == ["ciliumpy", "agent"]
    assert container["securityContext"]["privileged"] is True
    env = {v["name"]: v for v in container["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}

    ctx = _check_container(manifests, pod, container, tmp_path, monkeypatch)
    # The node's name reaches the agent (its bpffs and run directories) and the probe.
    assert ctx.params["node"] == SAMPLE_POD["spec.nodeName"]
    assert ctx.params["node_netns"] == SAMPLE_POD["spec.nodeName"]
    assert ctx.params["k8s_node_name"] == SAMPLE_POD["spec.nodeName"]
    # Kubernetes mode: no manifests directory (the pod's in-cluster configuration is used).
    assert not ctx.params["manifests"] and not ctx.params["k8s_kubeconfig_path"]
    # The ConfigMap's options arrive, and land on the mounted host directories.
    assert ctx.params["bpf_root"].startswith("/sys/fs/bpf/")
    host = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounted_from_host(path: str) -> dict:
        owner = max((p for p in host if path == p or path.startswith(p.rstrip("/") + "/")), key=len, default=None)
        assert owner is not None, f"{path} is not on a mounted volume"
        assert "hostPath" in volumes[host[owner]["name"]], f"{path}: {owner} is not a host directory"
        return host[owner]

    assert mounted_from_host(ctx.params["bpf_root"])["mountPropagation"] == "Bidirectional"
    mounted_from_host(ctx.params["run_dir"])
    mounted_from_host(ctx.params["state_dir"])
    for path in ("/opt/cni/bin", "/etc/cni/net.d", "/run/ciliumpy/cgroupv2", "/var/run/netns"):
        mounted_from_host(path)
    assert mounted_from_host("/lib/modules").get("readOnly") is True


def test_config_file_with_an_unknown_option_is_refused(tmp_path, monkeypatch):
    """The check above would see a ConfigMap key the agent does not know."""
    config = tmp_path / "bad.yaml"
    config.write_text("bpf-ct-global-tcp-max: 1024\nno-such-option: 1\n")
    with pytest.raises(click.BadParameter, match="unknown option.*no-such-option"):
        parse_ciliumpy(["ciliumpy", "agent", f"--config={config}", "--node-netns=n"], {}, monkeypatch)


def test_operator_deployment(manifests, tmp_path, monkeypatch):
    deployment = _one(manifests, "Deployment", "ciliumpy-operator", rbac.NAMESPACE)
    assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == rbac.OPERATOR.service_account
    assert pod["hostNetwork"] is True
    [container] = pod["containers"]
    assert container["command"] == ["ciliumpy", "operator"]
    ctx = _check_container(manifests, pod, container, tmp_path, monkeypatch)
    # Its Lease is where its Role lets it write.
    assert ctx.params["namespace"] == rbac.OPERATOR.namespace


def test_operator_may_update_exactly_our_crds():
    """The resourceNames of the operator's CRD update are the CRDs operator/crds/ installs."""
    shipped = sorted(yaml.safe_load(p.read_text())["metadata"]["name"] for p in (MANIFESTS / "crds").glob("*.yaml"))
    assert shipped == list(rbac.CRD_NAMES)
    [update] = [a for a in rbac.OPERATOR.cluster if a.kind == "CustomResourceDefinition" and "update" in a.verbs]
    assert update.names == rbac.CRD_NAMES


def test_operator_lease_is_the_one_its_role_names():
    from cilium_py.operator.leader import LEASE_NAME

    assert rbac.OPERATOR_LEASE == LEASE_NAME
