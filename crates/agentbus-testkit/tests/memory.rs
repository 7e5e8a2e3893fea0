//! The whole conformance suite against the in-memory engine (real clock), one test
//! per rule: `cargo nextest run -p agentbus-testkit`.

agentbus_testkit::conformance_tests!(agentbus_testkit::MemoryFactory);
