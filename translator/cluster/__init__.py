"""The NATS backplane: several gateways as one (docs/cluster.md).

Imported only when ``[cluster] nats`` is configured. `names` is pure (what each resource is
called on NATS), and so is `wire` (a published notify with the sensor's bytes); `node` is the
I/O: ownership leases and interest in JetStream key-value buckets, one publication per
accepted notification, per-subject history in a stream.
"""
