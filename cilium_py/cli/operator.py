"""`ciliumpy operator`: run the cluster's operator (CRDs, cluster-pool IPAM, identity GC),
leader-elected, in the foreground. The flags are Cilium's operator flags."""

from __future__ import annotations

import logging

import click

from cilium_py.cli.durations import GoDuration


@click.command()
@click.option("--kubeconfig", envvar="KUBECONFIG", default=None,
              help="kubeconfig file (default: in-cluster, else ~/.kube/config)")
@click.option("--namespace", envvar="CILIUMPY_K8S_NAMESPACE", default="kube-system", show_default=True,
              help="the operator's namespace (where its Lease lives)")
@click.option("--leader-election-lease-duration", type=GoDuration(), default="15s", show_default=True,
              help="how long a leader's lease lasts without renewal")
@click.option("--leader-election-renew-deadline", type=GoDuration(), default="10s", show_default=True,
              help="a leader that cannot renew for this long stops acting")
@click.option("--leader-election-retry-period", type=GoDuration(), default="2s", show_default=True,
              help="between tries to acquire or renew the lease")
@click.option("--cluster-pool-ipv4-cidr", multiple=True, metavar="CIDR",
              help="the pool pod CIDRs are cut from (repeat or comma-separate; none: IPAM off)")
@click.option("--cluster-pool-ipv4-mask-size", type=int, default=24, show_default=True,
              help="prefix length of each node's pod CIDR")
@click.option("--identity-gc-interval", type=GoDuration(allow_zero=True), default="15m",
              show_default=True, help="between identity GC runs (0: no GC)")
@click.option("--identity-heartbeat-timeout", type=GoDuration(), default="30m", show_default=True,
              help="an identity unused this long is marked, then deleted on a later run")
@click.option("--skip-crd-creation", is_flag=True, help="do not install the CRDs")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def operator(kubeconfig, namespace, leader_election_lease_duration, leader_election_renew_deadline,
             leader_election_retry_period, cluster_pool_ipv4_cidr, cluster_pool_ipv4_mask_size,
             identity_gc_interval, identity_heartbeat_timeout, skip_crd_creation, verbose):
    """Run the operator: install the CRDs, then, while leader, hand out pod CIDRs to
    CiliumNodes and garbage-collect unused CiliumIdentities."""
    config = operator_config(
        namespace=namespace, lease_duration=leader_election_lease_duration,
        renew_deadline=leader_election_renew_deadline, retry_period=leader_election_retry_period,
        pool_cidrs=cluster_pool_ipv4_cidr, mask_size=cluster_pool_ipv4_mask_size,
        gc_interval=identity_gc_interval, heartbeat_timeout=identity_heartbeat_timeout,
        install_crds=not skip_crd_creation)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cilium_py.k8s.client import ApiError, Kube
    from cilium_py.operator.app import Operator

    if config.pool is None:
        logging.getLogger(__name__).info("no --cluster-pool-ipv4-cidr: cluster-pool IPAM is off")
    try:
        kube = Kube(kubeconfig, user_agent="ciliumpy-operator")
    except Exception as e:  # noqa: BLE001 - kubeconfig errors come in many types
        raise click.ClickException(f"cannot load the Kubernetes configuration: {e}") from None
    try:
        Operator(kube, config).run_forever()
    except ApiError as e:
        raise click.ClickException(str(e)) from None
    finally:
        kube.close()


def operator_config(*, namespace, lease_duration, renew_deadline, retry_period, pool_cidrs,
                    mask_size, gc_interval, heartbeat_timeout, install_crds):
    """The OperatorConfig, every flag checked before anything connects."""
    from cilium_py.operator.app import OperatorConfig
    from cilium_py.operator.ipam import ClusterPool, PoolError
    from cilium_py.operator.leader import LeaderElectionConfig

    if not namespace:
        raise click.BadParameter("must not be empty", param_hint="--namespace")
    try:
        election = LeaderElectionConfig(lease_duration, renew_deadline, retry_period)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    pool = None
    if pool_cidrs:
        try:
            pool = ClusterPool.parse(pool_cidrs, mask_size)
        except PoolError as e:
            raise click.BadParameter(e.message, param_hint=e.flag) from None
    return OperatorConfig(namespace=namespace, leader_election=election, pool=pool,
                          identity_gc_interval=gc_interval, identity_heartbeat_timeout=heartbeat_timeout,
                          install_crds=install_crds)
