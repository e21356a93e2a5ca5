"""Scale-out mode: stateless camera-facing gateways and decode/classify workers on existing engines.

    camera ──wire──► gateway ──publish (msg id = camera/epoch/seq)──► NATS JetStream (R3 file stream)
                                                                          │ durable pull consumer
                                           PostgreSQL (partitioned) ◄── worker (decode, classify, insert-or-ignore)

A batch is acked to the camera only once JetStream has stored it with replication; a worker acks the JetStream
message only after its PostgreSQL transaction committed. JetStream's duplicate window and the unique frame key make
re-sends and redeliveries idempotent end to end. `taskcodec serve` (one process, SQLite) stays the embedded default.
"""
