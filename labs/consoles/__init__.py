"""Browser consoles: tickets, the session rules both transports share, the RFB filter,
and the two transports (the Channels consumer in the web process, websockify beside a
hypervisor). docs/console.md has the security design."""
