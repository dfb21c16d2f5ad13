"""The transparent recording relay.

Glossary: *listener* (accepts redirected connections), *origdst* (where the
subject meant to go), *relay* (sans-IO core: events in, commands out; records
before it forwards), *server* (the only asyncio module: carries out the
relay's commands), *sessions* (the table the witness cross-checks),
*attribution* (which process of the subject made the connection),
*policy* (destinations the subject may never reach).
"""
