"""Moving data between the services: ``base`` (what a consumer and a publisher can do),
``streams`` (that, on Redis streams, and why each prompt group is trained exactly once),
``messages`` (the wire schema, bytes in and out) and ``weight_sync`` (trainer-to-rollout
weight transfer)."""
