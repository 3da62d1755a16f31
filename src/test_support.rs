//! Helpers shared by the unit tests.

use http::{HeaderMap, HeaderName, HeaderValue};

/// A header map from `(name, value)` pairs, repeated names appended.
pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("valid test header name"),
            HeaderValue::from_str(value).expect("valid test header value"),
        );
    }
    map
}

/// A task waker that counts its wakes.
#[derive(Default)]
pub struct Counted(pub std::sync::atomic::AtomicUsize);

impl std::task::Wake for Counted {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}
