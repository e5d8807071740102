"""What travels between processes: the gRPC and plain TCP protocol between
the agents, TCP helpers, and the attach protocol between a guest and its
destination agent."""
