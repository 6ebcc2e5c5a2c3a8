"""The operator: what no single node may decide for the cluster, done by one leader per
cluster (`leader`, a Lease): the CustomResourceDefinitions it installs (`crds`, generated
from `schemas`), pod CIDRs per CiliumNode (`ipam`, cluster pool) and CiliumIdentity garbage
collection (`identitygc`); `app` runs them, `watch` prompts its passes."""
