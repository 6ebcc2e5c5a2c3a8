import pytest

from cilium_py.agent.errors import ValidationError
from cilium_py.agent.policy.selector import LabelSelector, PolicyError

WEB = {"k8s:app": "web", "k8s:tier": "front", "k8s:io.kubernetes.pod.namespace": "prod"}
HOST = {"reserved:host": ""}


def sel(obj, **kw):
    return LabelSelector.parse(obj, "spec.endpointSelector", **kw)


def test_none_is_not_given_and_empty_matches_everything():
    assert sel(None) is None
    assert sel({}).matches(WEB) and sel({}).matches(HOST) and sel({}).matches({})
    assert sel({}).is_empty()


@pytest.mark.parametrize("obj,labels,expected", [
    ({"matchLabels": {"app": "web"}}, WEB, True),
    ({"matchLabels": {"app": "db"}}, WEB, False),
    ({"matchLabels": {"app": "web", "tier": "back"}}, WEB, False),
    ({"matchLabels": {"k8s:app": "web"}}, WEB, True),
    ({"matchLabels": {"any:app": "web"}}, WEB, True),
    ({"matchLabels": {"container:app": "web"}}, WEB, False),
    ({"matchLabels": {"app": "web"}}, {"container:app": "web"}, True),
    ({"matchLabels": {"reserved:host": ""}}, HOST, True),
    ({"matchLabels": {"reserved:host": ""}}, {"k8s:host": ""}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "web"]}]}, WEB, True),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]}, WEB, False),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, WEB, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, WEB, False),
    ({"matchExpressions": [{"key": "missing", "operator": "NotIn", "values": ["x"]}]}, WEB, True),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, WEB, True),
    ({"matchExpressions": [{"key": "missing", "operator": "Exists"}]}, WEB, False),
    ({"matchExpressions": [{"key": "missing", "operator": "DoesNotExist"}]}, WEB, True),
    ({"matchExpressions": [{"key": "k8s:tier", "operator": "DoesNotExist"}]}, WEB, False),
    ({"matchLabels": {"app": "web"},
      "matchExpressions": [{"key": "tier", "operator": "In", "values": ["back"]}]}, WEB, False),
])
def test_matches(obj, labels, expected):
    assert sel(obj).matches(labels) is expected


def test_equal_selectors_are_equal_and_hashable():
    a = sel({"matchLabels": {"a": "1", "b": "2"}})
    b = sel({"matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}], "matchLabels": {"a": "1"}})
    assert a == b and len({a, b}) == 1


def test_kubernetes_selectors_cannot_carry_a_source():
    with pytest.raises(PolicyError) as e:
        sel({"matchLabels": {"k8s:app": "web"}}, allow_source=False)
    assert e.value.field == "spec.endpointSelector.matchLabels[k8s:app]"


def test_map_keys_rehomes_bare_keys():
    s = sel({"matchLabels": {"team": "a"}}).map_keys("k8s", "io.cilium.k8s.namespace.labels.")
    assert s.matches({"k8s:io.cilium.k8s.namespace.labels.team": "a"})
    assert not s.matches({"k8s:team": "a"})


@pytest.mark.parametrize("obj,field,fragment", [
    ("web", "spec.endpointSelector", "label selector"),
    ({"matchLabel": {"app": "web"}}, "spec.endpointSelector.matchLabel", "unknown field"),
    ({"matchLabels": ["app"]}, "spec.endpointSelector.matchLabels", "map"),
    ({"matchLabels": {"app": 1}}, "spec.endpointSelector.matchLabels[app]", "string"),
    ({"matchLabels": {"app": "-bad"}}, "spec.endpointSelector.matchLabels[app]", "label value"),
    ({"matchLabels": {"bad key": "x"}}, "spec.endpointSelector.matchLabels[bad key]", "label key"),
    ({"matchLabels": {"Example.COM/app": "x"}}, "spec.endpointSelector.matchLabels[Example.COM/app]", "prefix"),
    ({"matchLabels": {"x" * 64: "x"}}, f"spec.endpointSelector.matchLabels[{'x' * 64}]", "63"),
    ({"matchLabels": {"bogus:app": "x"}}, "spec.endpointSelector.matchLabels[bogus:app]", "unknown label source"),
    ({"matchExpressions": {"key": "a"}}, "spec.endpointSelector.matchExpressions", "list"),
    ({"matchExpressions": ["a"]}, "spec.endpointSelector.matchExpressions[0]", "object"),
    ({"matchExpressions": [{"operator": "Exists"}]}, "spec.endpointSelector.matchExpressions[0].key", "required"),
    ({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]},
     "spec.endpointSelector.matchExpressions[0].operator", "one of In, NotIn, Exists, DoesNotExist"),
    ({"matchExpressions": [{"key": "a", "operator": "In"}]},
     "spec.endpointSelector.matchExpressions[0].values", "non-empty"),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]},
     "spec.endpointSelector.matchExpressions[0].values", "non-empty"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
     "spec.endpointSelector.matchExpressions[0].values", "empty"),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]},
     "spec.endpointSelector.matchExpressions[0].values", "empty"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["ok", "not ok"]}]},
     "spec.endpointSelector.matchExpressions[0].values[1]", "label value"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "value": "x"}]},
     "spec.endpointSelector.matchExpressions[0].value", "unknown field"),
])
def test_validation_errors_name_the_field(obj, field, fragment):
    with pytest.raises(PolicyError) as e:
        sel(obj)
    assert e.value.field == field
    assert fragment in e.value.message
    assert isinstance(e.value, ValidationError)


def test_qualified_keys_and_cidr_labels_are_accepted():
    assert sel({"matchLabels": {"app.kubernetes.io/name": "web"}}).matches({"k8s:app.kubernetes.io/name": "web"})
    assert sel({"matchLabels": {"cidr:10.0.0.0/8": ""}}).matches({"cidr:10.0.0.0/8": ""})
