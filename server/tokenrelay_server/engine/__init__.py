"""The asyncio engine: generations (drive a provider, log, fan out), the hub
that owns them and their readers, routing, selection, takeover."""
