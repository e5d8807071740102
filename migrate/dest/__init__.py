"""The destination side: the agent, one session per guest, the fault space
that places pages, the attach listener and the gRPC servicer."""
