//! The whole conformance suite against the durable log engine, each rule on a fresh
//! data directory with the default fsync policy (`always`).

use std::sync::{Arc, Mutex};

use agentbus::Transport;
use agentbus_file::{FileEngine, FileOptions};
use agentbus_testkit::TransportFactory;
use futures::future::BoxFuture;

/// Opens a `FileEngine` on a new temporary directory per rule; the directories are
/// removed when the test's factory is dropped.
#[derive(Default)]
struct FileFactory {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

impl TransportFactory for FileFactory {
    fn name(&self) -> &str {
        "file"
    }

    fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().to_path_buf();
        self.dirs.lock().expect("not poisoned").push(dir);
        Box::pin(async move {
            Ok(Arc::new(FileEngine::open(path, FileOptions::default())?) as Arc<dyn Transport>)
        })
    }
}

agentbus_testkit::conformance_tests!(FileFactory::default());
