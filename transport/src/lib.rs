//! Async I/O shared by the gateway and the agent (filled in by the tunnel issue).
