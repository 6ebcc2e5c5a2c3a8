import os
import textwrap
import threading

import pytest

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.objects import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, Pod
from cilium_py.agent.sources.manifests import (
    ManifestsSource,
    ManifestSyntaxError,
    parse_documents,
)
from cilium_py.agent.store import Store


@pytest.fixture
def store():
    s = Store()
    yield s
    s.close()


def dedent(text):
    return textwrap.dedent(text).lstrip("\n")


def pod_yaml(name, port=80, ns=None, protocol=None, app=None, port_name=None):
    meta_ns = f", namespace: {ns}" if ns else ""
    proto = f", protocol: {protocol}" if protocol else ""
    pname = f", name: {port_name}" if port_name else ""
    return dedent(f"""
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}{meta_ns}, labels: {{app: {app or name}}}}}
        spec:
          containers:
          - name: main
            image: busybox
            ports: [{{containerPort: {port}{proto}{pname}}}]
        """)


NAMESPACE = dedent("""
    apiVersion: v1
    kind: Namespace
    metadata:
      name: prod
      labels: {team: a}
    """)


def one_error(errors):
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


# -- parse_documents -------------------------------------------------------------------

def test_multi_document_parse_with_defaults():
    text = NAMESPACE + "---\n" + pod_yaml("web", ns="prod") + "---\n" + pod_yaml("db") + "---\n"
    resources, errors = parse_documents(text, "x.yaml")
    assert errors == []
    assert [r.key for r in resources] == [("Namespace", "", "prod"), ("Pod", "prod", "web"), ("Pod", "default", "db")]
    ns, web, db = resources
    assert ns.namespace is None and ns.labels == {"team": "a"}
    assert web.labels == {"app": "web"} and web.source == "x.yaml"
    assert db.namespace == "default"
    assert db.ports[0].protocol == 6  # TCP, the API server's default


def test_malformed_yaml_names_file_and_line():
    text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [web\n"
    resources, errors = parse_documents(text, "dir/bad.yaml")
    err = one_error(errors)
    assert resources == []
    assert isinstance(err, ManifestSyntaxError) and isinstance(err, ValidationError)
    assert err.source == "dir/bad.yaml"
    assert str(err).startswith("dir/bad.yaml: invalid YAML at line 5")


def test_unknown_kind_names_document_and_field():
    text = NAMESPACE + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
    resources, errors = parse_documents(text, "a.yaml")
    err = one_error(errors)
    assert [r.kind for r in resources] == ["Namespace"], "the valid object of the same file is kept"
    assert (err.source, err.obj, err.field) == ("a.yaml", "document 2 (Deployment)", "kind")
    assert "unknown kind 'Deployment'" in err.message
    assert err.document == 2


def test_missing_name():
    resources, errors = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {labels: {a: b}}\n", "a.yaml")
    err = one_error(errors)
    assert (err.obj, err.field, err.message) == ("document 1 (Pod)", "metadata.name", "is required")
    assert str(err) == "a.yaml: document 1 (Pod): metadata.name: is required"


def test_bad_container_port():
    resources, errors = parse_documents(pod_yaml("web", port=70000), "a.yaml")
    err = one_error(errors)
    assert resources == []
    assert (err.source, err.obj, err.field) == ("a.yaml", "Pod default/web", "spec.containers[0].ports[0].containerPort")
    assert "70000" in err.message
    assert err.key == ("Pod", "default", "web")
    _, errors = parse_documents(pod_yaml("web", port='"80"'), "a.yaml")
    assert one_error(errors).field == "spec.containers[0].ports[0].containerPort"
    _, errors = parse_documents(pod_yaml("web", port=0), "a.yaml")
    assert "not in 1-65535" in one_error(errors).message


@pytest.mark.parametrize("protocol", ["tcp", "ICMP", "HTTP"])
def test_bad_protocol(protocol):
    _, errors = parse_documents(pod_yaml("web", protocol=protocol), "a.yaml")
    err = one_error(errors)
    assert err.field == "spec.containers[0].ports[0].protocol"
    assert "TCP, UDP or SCTP" in err.message


@pytest.mark.parametrize("protocol", ["TCP", "UDP", "SCTP"])
def test_good_protocols(protocol):
    resources, errors = parse_documents(pod_yaml("web", protocol=protocol), "a.yaml")
    assert errors == [] and len(resources) == 1


@pytest.mark.parametrize("name,ok", [
    ("http", True), ("http-alt", True), ("h2c", True), ("a" * 15, True),
    ("a" * 16, False), ("HTTP", False), ("http--alt", False), ("-http", False), ("8080", False),
])
def test_port_names(name, ok):
    _, errors = parse_documents(pod_yaml("web", port_name=name), "a.yaml")
    if ok:
        assert errors == []
    else:
        assert one_error(errors).field == "spec.containers[0].ports[0].name"


def test_ambiguous_named_port_is_rejected():
    text = dedent("""
        apiVersion: v1
        kind: Pod
        metadata: {name: web}
        spec:
          containers:
          - name: a
            ports: [{containerPort: 80, name: http}]
          - name: b
            ports: [{containerPort: 8080, name: http}]
        """)
    err = one_error(parse_documents(text, "a.yaml")[1])
    assert err.field == "spec.containers[1].ports[0].name"
    assert "spec.containers[0].ports[0]" in err.message


def test_pod_without_containers_and_with_node_name():
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {nodeName: node-1}\n"
    assert one_error(parse_documents(text, "a.yaml")[1]).field == "spec.containers"
    ok = pod_yaml("web") + "  nodeName: node-1\n"
    resources, errors = parse_documents(ok, "a.yaml")
    assert errors == [] and resources[0].node_name == "node-1"


def test_label_values_must_be_strings():
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {version: 1}}\n"
    err = one_error(parse_documents(text, "a.yaml")[1])
    assert (err.obj, err.field) == ("Namespace prod", "metadata.labels.version")
    assert "quote" in err.message


def test_wrong_api_version():
    text = "apiVersion: v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec: {}\n"
    err = one_error(parse_documents(text, "a.yaml")[1])
    assert err.field == "apiVersion" and "networking.k8s.io/v1" in err.message


def test_invalid_names():
    err = one_error(parse_documents("apiVersion: v1\nkind: Namespace\nmetadata: {name: Prod}\n", "a.yaml")[1])
    assert err.field == "metadata.name"
    err = one_error(parse_documents(pod_yaml("web", ns="bad_ns"), "a.yaml")[1])
    assert err.field == "metadata.namespace"


def test_service_ports():
    text = dedent("""
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          ports:
          - {name: http, port: 80, targetPort: http}
          - {name: alt, port: 99999, targetPort: 8080, protocol: UDP}
        """)
    err = one_error(parse_documents(text, "a.yaml")[1])
    assert (err.obj, err.field) == ("Service default/web", "spec.ports[1].port")


def test_policies_are_parsed_once_into_their_rules():
    text = dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: good, namespace: prod}
        spec: {endpointSelector: {}, ingress: [{fromEndpoints: [{}]}]}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: bad}
        spec:
          endpointSelector: {}
          ingress: [{toPorts: [{ports: [{port: "80"}, {port: "Bad_Name"}]}]}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: cluster}
        spec: {endpointSelector: {}}
        """)
    resources, errors = parse_documents(text, "p.yaml")
    assert [r.name for r in resources] == ["good", "cluster"]
    good, cluster = resources
    assert isinstance(good, CiliumNetworkPolicy) and isinstance(cluster, CiliumClusterwideNetworkPolicy)
    assert [(r.kind, r.namespace, r.name) for r in good.rules] == [("CiliumNetworkPolicy", "prod", "good")]
    assert good.rules[0].ingress[0].endpoints, "the rules are what the policy parser made of the spec"
    assert cluster.namespace is None and cluster.rules[0].namespace == ""
    err = one_error(errors)
    assert (err.source, err.obj, err.field) == ("p.yaml", "CiliumNetworkPolicy default/bad",
                                                "spec.ingress[0].toPorts[0].ports[1].port")
    assert err.key == ("CiliumNetworkPolicy", "default", "bad")


def test_list_and_json():
    text = dedent("""
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Namespace, metadata: {name: a}}
        - {apiVersion: v1, kind: Namespace, metadata: {}}
        """)
    resources, errors = parse_documents(text, "l.yaml")
    assert [r.name for r in resources] == ["a"]
    assert one_error(errors).obj == "document 1 item 1 (Namespace)"
    resources, errors = parse_documents('[{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}]', "n.json")
    assert errors == [] and resources[0].key == ("Node", "", "n1")
    err = one_error(parse_documents('{"kind": ', "n.json")[1])
    assert isinstance(err, ManifestSyntaxError) and "line 1" in err.message


# -- ManifestsSource -------------------------------------------------------------------

class Recorder:
    def __init__(self, store):
        self.events = []
        self.lock = threading.Lock()
        store.subscribe(self)

    def __call__(self, event, old, new):
        with self.lock:
            self.events.append((event, (new or old).key, new and new.source))


def write(directory, name, text):
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def test_sync_add_change_remove(tmp_path, store):
    d = str(tmp_path)
    write(d, "ns.yaml", NAMESPACE)
    write(d, "web.yaml", pod_yaml("web", ns="prod"))
    src = ManifestsSource(d, store)
    result = src.sync_once()
    assert sorted(result.upserted) == [("Namespace", "", "prod"), ("Pod", "prod", "web")]
    assert result.errors == [] and src.errors == []
    assert store.get(("Pod", "prod", "web")).source == os.path.join(d, "web.yaml")

    assert src.sync_once().upserted == [], "nothing changed, nothing written"

    write(d, "web.yaml", pod_yaml("web", ns="prod", port=8080))
    assert src.sync_once().upserted == [("Pod", "prod", "web")]
    assert store.get(("Pod", "prod", "web")).ports[0].port == 8080

    write(d, "db.yaml", pod_yaml("db", ns="prod"))
    assert src.sync_once().upserted == [("Pod", "prod", "db")]

    os.unlink(os.path.join(d, "db.yaml"))
    result = src.sync_once()
    assert result.deleted == [("Pod", "prod", "db")] and result.upserted == []
    assert store.get(("Pod", "prod", "db")) is None
    assert store.get(("Pod", "prod", "web")) is not None


def test_object_moving_between_files_is_not_deleted(tmp_path, store):
    d = str(tmp_path)
    write(d, "a.yaml", NAMESPACE + "---\n" + pod_yaml("web", ns="prod"))
    src = ManifestsSource(d, store)
    src.sync_once()
    recorder = Recorder(store)
    assert store.wait_idle(5)
    recorder.events.clear()

    write(d, "b.yaml", pod_yaml("web", ns="prod"))
    write(d, "a.yaml", NAMESPACE)
    result = src.sync_once()
    assert result.deleted == []
    assert store.wait_idle(5)
    assert recorder.events == [("upsert", ("Pod", "prod", "web"), os.path.join(d, "b.yaml"))]


def test_invalid_change_keeps_the_last_valid_version(tmp_path, store):
    d = str(tmp_path)
    write(d, "web.yaml", pod_yaml("web"))
    src = ManifestsSource(d, store)
    src.sync_once()

    write(d, "web.yaml", pod_yaml("web", port=70000) + "---\n" + pod_yaml("db"))
    result = src.sync_once()
    err = one_error(src.errors)
    assert err.field == "spec.containers[0].ports[0].containerPort"
    assert "previous valid version stays in effect" in err.message
    assert result.deleted == [] and result.upserted == [("Pod", "default", "db")]
    assert store.get(("Pod", "default", "web")).ports[0].port == 80

    write(d, "web.yaml", pod_yaml("web", port=81))
    result = src.sync_once()
    assert src.errors == []
    assert result.upserted == [("Pod", "default", "web")] and result.deleted == [("Pod", "default", "db")]


def test_new_invalid_object_is_not_stored(tmp_path, store):
    d = str(tmp_path)
    write(d, "web.yaml", pod_yaml("web", protocol="ICMP"))
    src = ManifestsSource(d, store)
    src.sync_once()
    err = one_error(src.errors)
    assert "stays in effect" not in err.message
    assert store.get(("Pod", "default", "web")) is None


def test_unparsable_file_keeps_its_objects_and_others_still_sync(tmp_path, store):
    d = str(tmp_path)
    write(d, "a.yaml", pod_yaml("web"))
    write(d, "b.yaml", pod_yaml("db"))
    src = ManifestsSource(d, store)
    src.sync_once()

    write(d, "a.yaml", "kind: Pod\nmetadata: {name: [\n")
    write(d, "b.yaml", pod_yaml("db", port=5432))
    result = src.sync_once()
    err = one_error(src.errors)
    assert err.source == os.path.join(d, "a.yaml")
    assert "invalid YAML at line" in err.message and "1 object last loaded from this file stays" in err.message
    assert result.deleted == []
    assert store.get(("Pod", "default", "web")) is not None
    assert store.get(("Pod", "default", "db")).ports[0].port == 5432


def test_unparsable_file_on_first_load_does_not_block_other_files(tmp_path, store):
    d = str(tmp_path)
    write(d, "a.yaml", "{{{")
    write(d, "b.yaml", pod_yaml("db"))
    src = ManifestsSource(d, store)
    src.sync_once()
    assert one_error(src.errors).source == os.path.join(d, "a.yaml")
    assert [r.name for r in store.list("Pod")] == ["db"]


def test_duplicate_definition_keeps_the_original_file(tmp_path, store):
    d = str(tmp_path)
    write(d, "b.yaml", pod_yaml("web", port=80))
    src = ManifestsSource(d, store)
    src.sync_once()
    write(d, "a.yaml", pod_yaml("web", port=81))
    src.sync_once()
    err = one_error(src.errors)
    assert err.source == os.path.join(d, "a.yaml")
    assert "also defined in" in err.message and "b.yaml" in err.message
    assert store.get(("Pod", "default", "web")).source == os.path.join(d, "b.yaml")


def test_objects_from_other_sources_are_left_alone(tmp_path, store):
    store.upsert(Pod(namespace="default", name="api-made", source="api"))
    write(str(tmp_path), "a.yaml", pod_yaml("web"))
    src = ManifestsSource(str(tmp_path), store)
    src.sync_once()
    os.unlink(tmp_path / "a.yaml")
    assert src.sync_once().deleted == [("Pod", "default", "web")]
    assert store.get(("Pod", "default", "api-made")) is not None


def test_only_manifest_files_are_read(tmp_path, store):
    d = str(tmp_path)
    write(d, "a.yml", pod_yaml("a"))
    write(d, "b.json", '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}}')
    write(d, ".#c.yaml", pod_yaml("c"))
    write(d, "notes.txt", "kind: nonsense")
    os.mkdir(os.path.join(d, "sub.yaml"))
    src = ManifestsSource(d, store)
    src.sync_once()
    assert src.errors == []
    assert sorted(r.name for r in store.list()) == ["a", "b"]


def test_missing_directory_is_reported_and_keeps_objects(tmp_path, store):
    d = tmp_path / "m"
    d.mkdir()
    write(str(d), "a.yaml", pod_yaml("web"))
    src = ManifestsSource(str(d), store)
    src.sync_once()
    os.unlink(d / "a.yaml")
    d.rmdir()
    result = src.sync_once()
    assert result.deleted == []
    assert "cannot list the directory" in one_error(src.errors).message


def test_start_watches_the_directory(tmp_path, store):
    d = str(tmp_path)
    write(d, "a.yaml", pod_yaml("web"))
    src = ManifestsSource(d, store)
    arrived = {}
    conds = threading.Condition()

    def on_event(event, old, new):
        with conds:
            arrived[(event, (new or old).name)] = True
            conds.notify_all()

    store.subscribe(on_event)
    src.start(interval=0.01)
    try:
        assert store.get(("Pod", "default", "web")) is not None, "start() loads before returning"
        write(d, "b.yaml", pod_yaml("db"))
        with conds:
            assert conds.wait_for(lambda: ("upsert", "db") in arrived, timeout=10)
        os.unlink(os.path.join(d, "a.yaml"))
        with conds:
            assert conds.wait_for(lambda: ("delete", "web") in arrived, timeout=10)
    finally:
        src.stop()


def test_a_parser_bug_is_reported_and_keeps_the_previous_version(tmp_path, store, monkeypatch):
    from cilium_py.agent import objects

    d = str(tmp_path)
    write(d, "web.yaml", pod_yaml("web"))
    src = ManifestsSource(d, store)
    src.sync_once()

    def broken(doc, source, where="object"):
        raise KeyError("surprise")

    monkeypatch.setitem(objects.PARSERS, "Pod", broken)
    write(d, "web.yaml", pod_yaml("web", port=81))
    result = src.sync_once()
    err = one_error(src.errors)
    assert (err.obj, err.key) == ("Pod default/web", ("Pod", "default", "web"))
    assert "internal error" in err.message and "previous valid version stays in effect" in err.message
    assert result.deleted == [] and store.get(("Pod", "default", "web")).ports[0].port == 80
