"""The descriptor pool of imgclf's generated V2 stubs: private, not protobuf's default one.

Why: tritonclient.grpc (and KServe's SDK) register their own copies of the same messages
(``inference.ModelInferRequest`` ...) in protobuf's default pool, and a second definition of a name
there is a TypeError at import. A private pool lets the server's stubs and those clients live in one
process (the tests, a benchmark); on the wire the messages are the same.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
