//! The transfer memory budget (`TRANSFER_MEMORY`): every large in-memory buffer of a
//! `put_stream` (S3 part buffers, the directory store's write buffer) is drawn from one budget
//! per store, so the memory they take is bounded by the budget whatever the number of
//! concurrent transfers.
//!
//! # Why a pool
//!
//! Freed part buffers are kept and handed to the next transfer instead of being returned to the
//! allocator. glibc serves a first 5–8 MiB allocation with `mmap`, but freeing it raises its
//! dynamic mmap threshold above that size, so every later part comes from a heap arena; the
//! multi-threaded runtime frees a part on whichever worker its upload ended, and glibc keeps
//! freed arena memory resident (it only trims the top of a heap). Measured with the staging
//! pattern (docs/performance.md): RSS then stays at the high-water mark of the buffers ever
//! live at once, spread over the arenas, even after every part is freed; with a pool it is
//! bounded by the buffers the budget allows, and no part pays for page faults again.
//!
//! # Accounting
//!
//! A semaphore of the budget's KiB (so a part of any size fits `acquire_many`'s `u32`) bounds
//! what is in use; pooled buffers are not in use but still exist, so before anything is
//! allocated anew, pooled buffers are freed until the new one fits: the bytes of all buffers
//! that exist (in use, reserved or pooled) never exceed the budget. [`BudgetStats`] reports
//! their high-water marks.
//!
//! # No deadlock
//!
//! A transfer waits for the budget ([`MemoryBudget::buffer`]) only while it holds none of it.
//! A transfer that already holds a part asks for more only with [`MemoryBudget::try_buffer`],
//! which never waits: when the budget is spent it goes on with what it holds (an S3 upload then
//! waits for its own part in flight and refills that buffer). Nobody holds budget while waiting
//! for budget, so there is no cycle; the semaphore is fair (a release goes to the longest
//! waiter, and `try_buffer` cannot take budget that a waiter is queued for), so no transfer
//! starves; and since the budget holds at least one part, every waiter eventually gets one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::StagingError;

/// Permits are KiB: `acquire_many` takes a `u32`, and bytes would cap a request at 4 GiB.
const UNIT: usize = 1024;

/// The budget's default (`TRANSFER_MEMORY`, 32 MiB).
pub const DEFAULT_TRANSFER_MEMORY: usize = 32 * 1024 * 1024;

/// A shared byte budget for transfer buffers; clones share it.
#[derive(Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    limit: usize,
    /// Buffers of exactly this capacity are pooled (the store's part size); others are freed.
    pooled_capacity: usize,
    semaphore: Arc<Semaphore>,
    pool: Mutex<Vec<Vec<u8>>>,
    /// Bytes of the buffers that exist: in use, reserved, or pooled.
    allocated: AtomicUsize,
    peak_allocated: AtomicUsize,
    /// Bytes handed out and not yet returned.
    in_use: AtomicUsize,
    peak_in_use: AtomicUsize,
    /// Times a transfer had to wait for budget.
    waits: AtomicU64,
    /// Transfers waiting for budget now.
    waiting: AtomicUsize,
    /// Times a transfer wanted more than it held and went on without (see `try_buffer`).
    refusals: AtomicU64,
    /// Buffers allocated anew (the rest were reused from the pool).
    fresh_buffers: AtomicU64,
}

/// What a [`MemoryBudget`] has seen, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStats {
    pub limit: usize,
    /// Bytes of the buffers that exist now (in use, reserved or pooled).
    pub allocated: usize,
    /// The most bytes of buffers that ever existed at once: never above `limit`.
    pub peak_allocated: usize,
    pub in_use: usize,
    pub peak_in_use: usize,
    pub waits: u64,
    pub refusals: u64,
    pub fresh_buffers: u64,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.inner.limit)
            .field("part", &self.inner.pooled_capacity)
            .finish_non_exhaustive()
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes whose buffers of `part_size` bytes are pooled. `limit` must
    /// hold at least one such buffer (a store checks that it holds two).
    pub fn new(limit: usize, part_size: usize) -> Result<Self, StagingError> {
        // Buffers are counted in whole KiB (rounded up), the limit rounded down: one part must
        // fit in those units too, or a transfer would wait for it forever.
        if part_size == 0 || part_size.div_ceil(UNIT) > limit / UNIT {
            return Err(StagingError::Config(format!(
                "a transfer memory budget of {limit} bytes cannot hold a part of {part_size} bytes"
            )));
        }
        let permits = limit / UNIT;
        if permits > Semaphore::MAX_PERMITS {
            return Err(StagingError::Config(format!(
                "a transfer memory budget of {limit} bytes is too large"
            )));
        }
        Ok(MemoryBudget {
            inner: Arc::new(Inner {
                limit,
                pooled_capacity: part_size,
                semaphore: Arc::new(Semaphore::new(permits)),
                pool: Mutex::new(Vec::new()),
                allocated: AtomicUsize::new(0),
                peak_allocated: AtomicUsize::new(0),
                in_use: AtomicUsize::new(0),
                peak_in_use: AtomicUsize::new(0),
                waits: AtomicU64::new(0),
                waiting: AtomicUsize::new(0),
                refusals: AtomicU64::new(0),
                fresh_buffers: AtomicU64::new(0),
            }),
        })
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    pub fn stats(&self) -> BudgetStats {
        let i = &self.inner;
        BudgetStats {
            limit: i.limit,
            allocated: i.allocated.load(Ordering::Relaxed),
            peak_allocated: i.peak_allocated.load(Ordering::Relaxed),
            in_use: i.in_use.load(Ordering::Relaxed),
            peak_in_use: i.peak_in_use.load(Ordering::Relaxed),
            waits: i.waits.load(Ordering::Relaxed),
            refusals: i.refusals.load(Ordering::Relaxed),
            fresh_buffers: i.fresh_buffers.load(Ordering::Relaxed),
        }
    }

    /// Whether a transfer is waiting for budget: one that holds a spare buffer should give it
    /// back rather than keep it.
    pub(crate) fn contended(&self) -> bool {
        self.inner.waiting.load(Ordering::Relaxed) > 0
    }

    /// An empty buffer of `capacity` bytes, waiting for budget as long as it takes. Call it
    /// only while holding nothing of this budget (see [No deadlock](self#no-deadlock)).
    pub(crate) async fn buffer(&self, capacity: usize) -> Result<PartBuf, StagingError> {
        let lease = self.lease(capacity).await?;
        Ok(self.fill_lease(lease))
    }

    /// An empty buffer of `capacity` bytes if the budget has it to spare now, without waiting.
    pub(crate) fn try_buffer(&self, capacity: usize) -> Option<PartBuf> {
        let permits = permits(capacity)?;
        match self.inner.semaphore.clone().try_acquire_many_owned(permits) {
            Ok(permit) => Some(self.fill_lease(self.leased(capacity, permit))),
            Err(_) => {
                self.inner.refusals.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// `bytes` of the budget for a buffer allocated elsewhere (the directory store's write
    /// buffer), waiting as long as it takes; the same rule as [`buffer`](Self::buffer).
    pub(crate) async fn reserve(&self, bytes: usize) -> Result<Lease, StagingError> {
        let mut lease = self.lease(bytes).await?;
        self.inner.make_room(&mut self.inner.pool(), bytes);
        lease.reserved = true;
        Ok(lease)
    }

    async fn lease(&self, bytes: usize) -> Result<Lease, StagingError> {
        let too_large = || {
            StagingError::Config(format!(
                "a buffer of {bytes} bytes does not fit the transfer memory budget of {} bytes",
                self.inner.limit
            ))
        };
        if bytes > self.inner.limit {
            return Err(too_large());
        }
        let permits = permits(bytes).ok_or_else(too_large)?;
        let semaphore = self.inner.semaphore.clone();
        let permit = match semaphore.clone().try_acquire_many_owned(permits) {
            Ok(p) => p,
            Err(_) => {
                self.inner.waits.fetch_add(1, Ordering::Relaxed);
                let _waiting = Waiting::new(&self.inner.waiting);
                semaphore
                    .acquire_many_owned(permits)
                    .await
                    // Never closed: it lives as long as the budget.
                    .map_err(|_| StagingError::Config("the transfer memory budget closed".into()))?
            }
        };
        Ok(self.leased(bytes, permit))
    }

    fn leased(&self, bytes: usize, permit: OwnedSemaphorePermit) -> Lease {
        let in_use = self.inner.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.inner.peak_in_use.fetch_max(in_use, Ordering::Relaxed);
        Lease {
            budget: self.inner.clone(),
            bytes,
            reserved: false,
            _permit: permit,
        }
    }

    /// A buffer for a lease: a pooled one of the right capacity, or a new one once pooled
    /// buffers have made room for it.
    fn fill_lease(&self, lease: Lease) -> PartBuf {
        let capacity = lease.bytes;
        {
            // One lock for both, so that a buffer pooled meanwhile is reused, never evicted
            // to make room for a new one of the same size.
            let mut pool = self.inner.pool();
            if capacity == self.inner.pooled_capacity {
                if let Some(data) = pool.pop() {
                    return PartBuf { data, lease };
                }
            }
            self.inner.make_room(&mut pool, capacity);
        }
        self.inner.fresh_buffers.fetch_add(1, Ordering::Relaxed);
        // Allocated at full capacity, so filling never reallocates or copies.
        PartBuf {
            data: Vec::with_capacity(capacity),
            lease,
        }
    }
}

impl Inner {
    /// Frees pooled buffers until `bytes` more fit, and counts them as allocated. The lease
    /// for them is already held, so the bytes in use plus these fit the limit: freeing every
    /// pooled buffer always makes room.
    fn make_room(&self, pool: &mut Vec<Vec<u8>>, bytes: usize) {
        while self.allocated.load(Ordering::Relaxed) + bytes > self.limit {
            let Some(evicted) = pool.pop() else { break };
            self.allocated
                .fetch_sub(evicted.capacity(), Ordering::Relaxed);
        }
        let allocated = self.allocated.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_allocated.fetch_max(allocated, Ordering::Relaxed);
    }

    fn pool(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        // The pool holds plain buffers: one left by a panicking thread is still a buffer.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a waiter for as long as it waits, also when its future is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn permits(bytes: usize) -> Option<u32> {
    u32::try_from(bytes.div_ceil(UNIT)).ok()
}

/// Budget held; returned when dropped.
pub(crate) struct Lease {
    budget: Arc<Inner>,
    bytes: usize,
    /// The bytes were counted as allocated when reserved (no buffer of ours holds them).
    reserved: bool,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.bytes, Ordering::Relaxed);
        if self.reserved {
            self.budget
                .allocated
                .fetch_sub(self.bytes, Ordering::Relaxed);
        }
        // The permit is released after this, once the memory is accounted for.
    }
}

/// A buffer drawn from a [`MemoryBudget`], at most its capacity long. Dropped, it goes back to
/// the pool (or is freed) before its budget is released.
pub(crate) struct PartBuf {
    data: Vec<u8>,
    lease: Lease,
}

impl PartBuf {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.data.len()
    }

    /// The bytes it holds when full.
    pub(crate) fn capacity(&self) -> usize {
        self.lease.bytes
    }

    pub(crate) fn is_full(&self) -> bool {
        self.data.len() == self.lease.bytes
    }

    /// Appends as much of `data` as fits; returns how much that was.
    pub(crate) fn fill(&mut self, data: &[u8]) -> usize {
        let take = (self.lease.bytes - self.data.len()).min(data.len());
        self.data.extend_from_slice(&data[..take]);
        take
    }

    /// The content as [`Bytes`] for a request body, without copying. The buffer (and its
    /// budget) comes back when both the request's last reference and the returned
    /// [`Frozen`] are gone; [`Frozen::reclaim`] gets it back for reuse once the request let go.
    pub(crate) fn freeze(self) -> (Bytes, Frozen) {
        let shared = Arc::new(self);
        let bytes = Bytes::from_owner(Shared(shared.clone()));
        (bytes, Frozen(shared))
    }
}

impl Drop for PartBuf {
    fn drop(&mut self) {
        let inner = &self.lease.budget;
        let mut data = std::mem::take(&mut self.data);
        if data.capacity() == inner.pooled_capacity {
            data.clear();
            inner.pool().push(data);
        } else {
            inner
                .allocated
                .fetch_sub(data.capacity(), Ordering::Relaxed);
        }
    }
}

/// The owner behind a frozen buffer's [`Bytes`].
struct Shared(Arc<PartBuf>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0.data
    }
}

/// The sender's handle on a frozen buffer.
pub(crate) struct Frozen(Arc<PartBuf>);

impl Frozen {
    /// The buffer, emptied, if nothing else refers to it any more (the request is done);
    /// otherwise `None`, and the buffer returns to the budget once the request drops it.
    pub(crate) fn reclaim(self) -> Option<PartBuf> {
        let mut buf = Arc::into_inner(self.0)?;
        buf.data.clear();
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[tokio::test]
    async fn buffers_are_pooled_and_the_allocated_bytes_stay_within_the_limit() {
        let budget = MemoryBudget::new(3 * MIB, MIB).expect("budget");
        let mut a = budget.buffer(MIB).await.expect("a");
        assert_eq!(a.fill(&[7u8; 3000]), 3000);
        let b = budget.buffer(MIB).await.expect("b");
        let c = budget.try_buffer(MIB).expect("c fits");
        assert!(budget.try_buffer(MIB).is_none(), "the budget is spent");
        drop((a, b, c));
        let stats = budget.stats();
        assert_eq!(
            (stats.in_use, stats.allocated, stats.fresh_buffers),
            (0, 3 * MIB, 3),
            "freed buffers are kept for reuse"
        );
        let reused = budget.buffer(MIB).await.expect("reused");
        assert_eq!(reused.len(), 0, "a reused buffer starts empty");
        assert_eq!(budget.stats().fresh_buffers, 3);
        // A buffer of another size makes room by freeing pooled ones.
        let odd = budget.buffer(2 * MIB).await.expect("odd");
        let stats = budget.stats();
        assert_eq!(stats.allocated, 3 * MIB);
        assert_eq!(stats.peak_allocated, 3 * MIB);
        drop((reused, odd));
        assert_eq!(budget.stats().allocated, MIB, "the odd buffer is freed");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_budget_a_frozen_buffer_releases_once_the_request_drops_it() {
        let budget = MemoryBudget::new(MIB, MIB).expect("budget");
        let mut part = budget.buffer(MIB).await.expect("part");
        part.fill(b"abc");
        let (bytes, frozen) = part.freeze();
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.buffer(MIB).await.map(|b| b.len()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // The request still holds the bytes: nothing to reclaim, the budget stays spent.
        assert!(frozen.reclaim().is_none());
        assert_eq!(&bytes[..], b"abc");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(bytes);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter is served")
            .expect("task")
            .expect("buffer");
        assert_eq!(got, 0);
        assert_eq!(budget.stats().waits, 1);
    }

    #[tokio::test]
    async fn reclaim_returns_the_buffer_when_the_request_is_done() {
        let budget = MemoryBudget::new(2 * MIB, MIB).expect("budget");
        let mut part = budget.buffer(MIB).await.expect("part");
        part.fill(b"abc");
        let (bytes, frozen) = part.freeze();
        drop(bytes);
        let again = frozen.reclaim().expect("unique again");
        assert_eq!(again.len(), 0);
        assert_eq!(budget.stats().in_use, MIB, "still held by the sender");
    }

    #[tokio::test]
    async fn try_buffer_does_not_jump_the_queue() {
        let budget = MemoryBudget::new(2 * MIB, MIB).expect("budget");
        let held = budget.buffer(2 * MIB).await.expect("all of it");
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.buffer(2 * MIB).await.map(|b| b.len()) }
        });
        tokio::task::yield_now().await;
        drop(held);
        // The waiter is owed the whole budget: a try may not take half of it.
        assert!(budget.try_buffer(MIB).is_none());
        waiter.await.expect("task").expect("served");
    }

    #[test]
    fn a_budget_must_hold_a_part() {
        assert!(MemoryBudget::new(MIB - 1, MIB).is_err());
        assert!(MemoryBudget::new(MIB, 0).is_err());
    }
}
