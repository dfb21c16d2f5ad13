"""The transparent recording relay.

Glossary: *listener* (accepts redirected connections), *origdst* (where the
subject meant to go), *relay* (sans-IO core: events in, commands out; records
before it forwards), *server* (the asyncio relay: carries out the
relay's commands; and each session's open, naming and close records),
*handoff* (the native data plane's front: accept, open, name, then hand
the subject's socket to agent/native's relay threads, which connect
upstream), *sessions* (the table the witness cross-checks),
*attribution* (which process of the subject made the connection),
*policy* (destinations the subject may never reach).
"""
