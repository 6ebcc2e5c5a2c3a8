"""The daemon hands Hubble a node view over the parts it runs: the control plane and the
service manager it was given, and the node's pinned ipcache through the shared handle."""

from __future__ import annotations

import pytest

from cilium_py.agent.daemon import Agent, AgentConfig
from cilium_py.agent.hubble import HubbleConfig
from cilium_py.datapath.maps.base import shared_open_count

pytestmark = pytest.mark.bpf


class Services:
    """The parts of ServiceManager the daemon calls here."""

    generation = 4

    def stop(self):
        pass

    def close(self):
        pass

    def frontend_service(self, ip, port, protocol):
        return ("web", "shop") if (ip, port, protocol) == ("10.96.0.10", 80, 6) else None


def test_hubble_gets_the_agents_node_view(datapath, maps, tmp_path):
    agent = Agent(AgentConfig(datapath=datapath.config, run_dir=str(tmp_path),
                              hubble=HubbleConfig(enabled=True)))
    agent.services = Services()
    maps.ipcache.upsert("10.244.7.7", 4321)
    before = shared_open_count()
    agent._start_observability()
    try:
        view = agent.hubble.parser.node_view
        assert view is agent.node_view
        assert view.service_by_frontend("10.96.0.10", 80, 6) == ("web", "shop")
        assert view.identity_by_ip("10.244.7.7") == 4321  # read from the pinned ipcache
        assert view.generation == (0, 4)  # no control plane: a datapath-only agent
    finally:
        agent.stop()
    assert shared_open_count() == before  # the view's and Hubble's handles are released
