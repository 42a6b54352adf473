//! Byte buffers kept per thread from one image to the next: the decoded JPEG
//! region and the image between the resize passes. Reusing them saves the
//! allocation, its page faults and the zeroing of memory that is about to be
//! overwritten whole.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread's kept buffer.
pub(crate) type Kept = LocalKey<RefCell<Vec<u8>>>;

/// The buffer `kept` holds on this thread (empty the first time), leaving
/// it empty until [`keep`] returns one.
pub(crate) fn take(kept: &'static Kept) -> Vec<u8> {
    kept.with(|buffer| std::mem::take(&mut *buffer.borrow_mut()))
}

/// Keeps `buffer` for the next [`take`] on this thread, unless it holds
/// more than `limit` bytes (a rare large image is freed instead).
pub(crate) fn keep(kept: &'static Kept, buffer: Vec<u8>, limit: usize) {
    if buffer.capacity() <= limit {
        kept.with(|slot| *slot.borrow_mut() = buffer);
    }
}

/// Makes `buffer` `len` bytes long for a writer that overwrites all of it:
/// old contents stay, and only bytes it never held are zeroed.
pub(crate) fn resize_for_overwrite(buffer: &mut Vec<u8>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0);
    } else {
        buffer.truncate(len);
    }
}
