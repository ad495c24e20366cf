//! The fuzz loop: a seeded generator, a mutator, and a runner that checks
//! every input for panics (caught, counted, reported with the input's hex),
//! hangs (a watchdog thread) and allocations sized beyond what the input
//! could justify (a counting global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// SplitMix64: tiny, fast and the same on every platform and Rust version,
/// so a seed reproduces an input forever.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `num` / `den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    /// A length: mostly short, sometimes long.
    pub fn len(&mut self) -> usize {
        match self.below(100) {
            0 => self.below(64 * 1024),
            1..=9 => self.below(2048),
            _ => self.below(64),
        }
    }
}

/// Integers that sit on the edges a length or count field is checked against.
const INTERESTING: [i64; 16] = [
    0,
    1,
    2,
    3,
    4,
    5,
    8,
    127,
    128,
    255,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    -1,
    -2,
    i32::MIN as i64,
];

/// Damages a valid input: flipped bits, interesting integers written over
/// length and count fields, truncation, duplicated or inserted pieces.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = *rng.pick(&[0, 0xff, 0x7f, 0x80, b'$', b'\'', b'"', b';', b'{']);
            }
            2 if len > 0 => input.truncate(rng.below(len)),
            3 if len >= 4 => {
                // An int32 (length, count) or, for an int16, half of one.
                let i = rng.below(len - 3);
                let v = *rng.pick(&INTERESTING) as i32;
                let v = if rng.chance(1, 4) {
                    v.wrapping_add(len as i32 - i as i32)
                } else {
                    v
                };
                input[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            4 if len >= 2 => {
                let i = rng.below(len - 1);
                let v = *rng.pick(&INTERESTING) as i16;
                input[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(32)).min(len);
                let piece = input[a..b].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, piece);
            }
            6 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let piece = rng.bytes(n);
                input.splice(at..at, piece);
            }
            7 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                input.drain(a..b);
            }
            _ => {
                let at = rng.below(len + 1);
                input.insert(at, rng.byte());
            }
        }
    }
}

/// One kind of untrusted input: a generator of valid-looking inputs and the
/// entry point that parses one.
pub struct Target {
    pub name: &'static str,
    /// A structured, valid input.
    pub generate: fn(&mut Rng) -> Vec<u8>,
    pub run: fn(&[u8]),
    /// The largest single allocation an input of `len` bytes may cause.
    pub alloc_cap: fn(usize) -> usize,
}

/// The input number `index` of the run seeded `seed`: a function of the two
/// alone, so a reported (seed, index) is regenerated exactly.
pub fn input(target: &Target, seed: u64, index: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93));
    match rng.below(10) {
        // Pure noise.
        0 => {
            let n = rng.len();
            rng.bytes(n)
        }
        // Valid.
        1..=3 => (target.generate)(&mut rng),
        // Valid, then damaged.
        _ => {
            let mut v = (target.generate)(&mut rng);
            mutate(&mut rng, &mut v);
            v
        }
    }
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex input"))
        .collect()
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Summary {
    pub inputs: u64,
    pub panics: u64,
    pub hangs: u64,
    pub over_alloc: u64,
    pub max_input_time: Duration,
    /// The index of the slowest input.
    pub slowest: u64,
    pub max_alloc: usize,
    pub elapsed: Duration,
    /// Up to a few failures: what, the input's index and hex.
    pub failures: Vec<String>,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.panics == 0 && self.hangs == 0 && self.over_alloc == 0
    }
}

/// The seed of a run: `PGSHIFT_FUZZ_SEED` (decimal or 0x-hex), else `default`.
pub fn seed(default: u64) -> u64 {
    match std::env::var("PGSHIFT_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16))
                .expect("PGSHIFT_FUZZ_SEED is a number")
        }
        Err(_) => default,
    }
}

/// How long one input may run before the watchdog calls it a hang: far
/// beyond any input's time (microseconds), so a slow machine never trips
/// it; `PGSHIFT_FUZZ_HANG_SECS` overrides.
fn hang_limit() -> Duration {
    let secs = std::env::var("PGSHIFT_FUZZ_HANG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    Duration::from_secs_f64(secs)
}

thread_local! {
    /// The largest single allocation on this thread since the last reset.
    static MAX_ALLOC: Cell<usize> = const { Cell::new(0) };
}

/// Counts the largest single allocation per thread (inputs of a target run
/// on one thread, so the figure is theirs alone).
pub struct CountingAlloc;

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    let _ = MAX_ALLOC.try_with(|m| {
        if size > m.get() {
            m.set(size);
        }
    });
}

fn take_max_alloc() -> usize {
    MAX_ALLOC.try_with(|m| m.replace(0)).unwrap_or(0)
}

thread_local! {
    /// The last panic's message on this thread, kept by the hook.
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Panics on `fuzz-…` threads are kept (for the summary) instead of
/// printed: a run may catch many.
fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let fuzzing = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("fuzz-"));
            if !fuzzing {
                return default(info);
            }
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let _ = PANIC.try_with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
        }));
    });
}

fn take_panic() -> String {
    PANIC
        .try_with(|p| p.borrow_mut().take())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Runs `count` inputs of `target` from `seed` on a thread of its own (named
/// `fuzz-…`, so its panics are caught quietly), with a watchdog: an input
/// still running after the hang limit is reported with its hex and ends the
/// process, since a stuck thread cannot be stopped.
pub fn run(target: &'static Target, seed: u64, count: u64) -> Summary {
    install_quiet_panic_hook();
    let limit = hang_limit();
    // Start of the current input, in µs since `epoch` (0: none running).
    let epoch = Instant::now();
    let started = Arc::new(AtomicU64::new(0));
    let current = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (started, current, done) = (started.clone(), current.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                let s = started.load(Ordering::SeqCst);
                let now = epoch.elapsed().as_micros() as u64;
                if s != 0 && now.saturating_sub(s) > limit.as_micros() as u64 {
                    let index = current.load(Ordering::SeqCst);
                    let data = input(target, seed, index);
                    // Straight to stderr: the test harness's capture
                    // would swallow it with the process.
                    let _ = writeln!(
                        std::io::stderr(),
                        "fuzz {}: HANG: input {index} of seed {seed:#x} still runs after {limit:?}; input hex: {}",
                        target.name,
                        hex(&data)
                    );
                    std::process::exit(3);
                }
            }
        })
    };
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{}", target.name))
        .spawn(move || {
            let mut s = Summary::default();
            let t0 = Instant::now();
            for index in 0..count {
                let data = input(target, seed, index);
                current.store(index, Ordering::SeqCst);
                take_max_alloc();
                let t = Instant::now();
                started.store(
                    (epoch.elapsed().as_micros() as u64).max(1),
                    Ordering::SeqCst,
                );
                let result = catch_unwind(AssertUnwindSafe(|| (target.run)(&data)));
                started.store(0, Ordering::SeqCst);
                let took = t.elapsed();
                let alloc = take_max_alloc();
                s.inputs += 1;
                if took > s.max_input_time {
                    s.max_input_time = took;
                    s.slowest = index;
                }
                s.max_alloc = s.max_alloc.max(alloc);
                let failure = if result.is_err() {
                    s.panics += 1;
                    Some(format!("panic: {}", take_panic()))
                } else if alloc > (target.alloc_cap)(data.len()) {
                    s.over_alloc += 1;
                    Some(format!(
                        "an allocation of {alloc} bytes for an input of {} bytes",
                        data.len()
                    ))
                } else {
                    None
                };
                if let Some(f) = failure
                    && s.failures.len() < 5
                {
                    s.failures.push(format!(
                        "{f}\n    input {index} of seed {seed:#x}; hex: {}",
                        hex(&data)
                    ));
                }
            }
            s.elapsed = t0.elapsed();
            s
        })
        .expect("spawn the fuzz thread");
    let summary = worker.join().expect("the fuzz thread catches panics");
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    summary
}

/// Runs one input (e.g. a regression case) the way [`run`] does.
pub fn run_one(target: &Target, data: &[u8]) -> Result<(), String> {
    install_quiet_panic_hook();
    let run = target.run;
    let data = data.to_vec();
    let cap = (target.alloc_cap)(data.len());
    std::thread::Builder::new()
        .name(format!("fuzz-{}-one", target.name))
        .spawn(move || {
            take_max_alloc();
            let r = catch_unwind(AssertUnwindSafe(|| run(&data)));
            let alloc = take_max_alloc();
            match r {
                Err(_) => Err(format!("panic: {}", take_panic())),
                Ok(()) if alloc > cap => Err(format!(
                    "an allocation of {alloc} bytes for an input of {} bytes",
                    data.len()
                )),
                Ok(()) => Ok(()),
            }
        })
        .expect("spawn")
        .join()
        .expect("panics are caught")
}

/// The process's peak resident set size (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
