//! The proxy: listener, sessions, backends, route, pause gate, cancel keys, TLS.
