"""The three policy kinds as stored objects: their metadata and the rules the policy parser
(cilium_py.agent.policy.api, the parser of these kinds) made of them, parsed once here."""

from __future__ import annotations

from dataclasses import dataclass

from cilium_py.agent.objects.base import Resource, parse_meta
from cilium_py.agent.policy.api import Rule, parse_policy
from cilium_py.agent.policy.selector import PolicyError
from cilium_py.vocab import CILIUM_CLUSTERWIDE_NETWORK_POLICY, CILIUM_NETWORK_POLICY, NETWORK_POLICY


@dataclass(frozen=True, kw_only=True)
class Policy(Resource):
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, kw_only=True)
class NetworkPolicy(Policy):
    kind = NETWORK_POLICY
    api_version = "networking.k8s.io/v1"


@dataclass(frozen=True, kw_only=True)
class CiliumNetworkPolicy(Policy):
    kind = CILIUM_NETWORK_POLICY
    api_version = "cilium.io/v2"


@dataclass(frozen=True, kw_only=True)
class CiliumClusterwideNetworkPolicy(Policy):
    kind = CILIUM_CLUSTERWIDE_NETWORK_POLICY
    api_version = "cilium.io/v2"
    namespaced = False


POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.kind: cls for cls in (NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)}


def _policy_parser(cls: type[Policy]):
    def parse(doc, source: str, where: str = "object") -> Policy:
        meta, c = parse_meta(cls, doc, source, where)
        # The rules are parsed only for an object that is otherwise valid: a wrong apiVersion
        # or label says more about the mistake than what the rule parser makes of it.
        c.raise_if_errors()
        try:
            rules = parse_policy(cls.kind, meta.namespace, meta.name, doc)
        except PolicyError as e:
            c.error(e.field, e.message)
            c.raise_if_errors()
        return cls(**meta.common, rules=tuple(rules))

    parse.__name__ = parse.__qualname__ = f"parse_{cls.kind}"
    parse.__doc__ = f"A {cls.kind} with its rules; InvalidObject naming the field otherwise."
    return parse


parse_network_policy = _policy_parser(NetworkPolicy)
parse_cilium_network_policy = _policy_parser(CiliumNetworkPolicy)
parse_cilium_clusterwide_network_policy = _policy_parser(CiliumClusterwideNetworkPolicy)
