"""Live pages: events published after commit, and the websocket that carries them."""
