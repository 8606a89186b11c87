"""Remote inference over ZeroMQ (issue #13): the wire format, the policy server, CURVE keys.

``mm-fusion serve`` hosts an engine (``server``), ``engine.backend: remote`` steps through one
(``mm_fusion_ros.engine.remote_engine``), and ``mm_fusion_ros.client.PolicyClient`` gives robots without
ROS the same loop. Importing this package loads neither numpy nor ZeroMQ: the config layer checks
endpoints with ``endpoint`` alone.
"""
