//! A fault-injecting TCP proxy for loopback tests: it sits between nodes and the server and,
//! per connection (chosen by a seeded generator, so a run's faults repeat), passes bytes
//! through, refuses at once, cuts the connection after a random number of bytes (mid-chunk,
//! mid-handshake), stalls for a while, or delays every read.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes pass untouched.
    Pass,
    /// Closed as soon as it is accepted.
    Refuse,
    /// Both directions cut once this many bytes have passed.
    CutAfter(u64),
    /// Nothing passes for `millis` once `after` bytes have passed; then it goes on.
    Stall { after: u64, millis: u64 },
    /// Every read waits this many milliseconds before it is passed on.
    Delay(u64),
}

impl Fault {
    /// This kind's slot in [`ChaosProxy::counts`].
    fn kind(self) -> usize {
        match self {
            Self::Pass => 0,
            Self::Refuse => 1,
            Self::CutAfter(_) => 2,
            Self::Stall { .. } => 3,
            Self::Delay(_) => 4,
        }
    }

    /// The fault of the `n`th connection: the first four get one of each fault that needs
    /// bytes to act, at byte counts every connection reaches (a TLS handshake alone is larger),
    /// so each kind certainly fires; the rest are drawn.
    fn nth(n: usize, rng: &mut impl Rng) -> Self {
        match n {
            0 => Self::CutAfter(rng.random_range(1..1_000)),
            1 => Self::Stall {
                after: rng.random_range(0..1_000),
                millis: rng.random_range(500..2_500),
            },
            2 => Self::Refuse,
            3 => Self::Delay(rng.random_range(2..30)),
            _ => Self::draw(rng),
        }
    }

    fn draw(rng: &mut impl Rng) -> Self {
        match rng.random_range(0..100) {
            0..40 => Self::Pass,
            40..50 => Self::Refuse,
            50..72 => Self::CutAfter(rng.random_range(1..400_000)),
            72..86 => Self::Stall {
                after: rng.random_range(0..200_000),
                millis: rng.random_range(500..2_500),
            },
            _ => Self::Delay(rng.random_range(2..30)),
        }
    }
}

/// How many times each kind of fault took effect on a connection (pass, refuse, cut, stall,
/// delay): a connection counts when its fault acts on real bytes, not when it is drawn.
type Fired = Arc<[AtomicUsize; 5]>;

/// The proxy, running until dropped.
pub struct ChaosProxy {
    /// The loopback port nodes dial.
    pub port: u16,
    fired: Fired,
    stop: Arc<AtomicBool>,
}

impl ChaosProxy {
    /// Proxies a free loopback port to `127.0.0.1:upstream`, drawing faults from `seed`.
    pub fn start(upstream: u16, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("address").port();
        listener.set_nonblocking(true).expect("non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let fired: Fired = Arc::new(Default::default());
        {
            let (stop, fired) = (stop.clone(), fired.clone());
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut accepted = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let fault = Fault::nth(accepted, &mut rng);
                    accepted += 1;
                    let fired = fired.clone();
                    std::thread::spawn(move || relay(client, upstream, fault, &fired));
                }
            });
        }
        Self { port, fired, stop }
    }

    /// How many connections each kind of fault acted on: passed whole, refused, cut, stalled,
    /// delayed. A cut or stall drawn for a connection that closed before its byte count was
    /// reached never fired and is not counted.
    pub fn counts(&self) -> [usize; 5] {
        std::array::from_fn(|kind| self.fired[kind].load(Ordering::Relaxed))
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Carries one connection to the server, applying `fault` and counting it in `fired` once it
/// acts.
fn relay(client: TcpStream, upstream: u16, fault: Fault, fired: &Fired) {
    if fault == Fault::Refuse {
        drop(client);
        fired[fault.kind()].fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let passed = Arc::new(AtomicU64::new(0));
    let acted = Arc::new(AtomicBool::new(false));
    let ends = [client, server];
    let pump = |from: usize| {
        let reader = ends[from].try_clone().expect("clone");
        let writer = ends[1 - from].try_clone().expect("clone");
        let both = [
            ends[0].try_clone().expect("clone"),
            ends[1].try_clone().expect("clone"),
        ];
        let (passed, acted) = (passed.clone(), acted.clone());
        std::thread::spawn(move || pump(reader, writer, &both, &passed, &acted, fault))
    };
    let (up, down) = (pump(0), pump(1));
    let _ = up.join();
    let _ = down.join();
    // A pass counts once its connection carried bytes through to its end.
    if acted.load(Ordering::Relaxed) || (fault == Fault::Pass && passed.load(Ordering::Relaxed) > 0)
    {
        fired[fault.kind()].fetch_add(1, Ordering::Relaxed);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    both: &[TcpStream; 2],
    passed: &AtomicU64,
    acted: &AtomicBool,
    fault: Fault,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut stalled = false;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let before = passed.fetch_add(n as u64, Ordering::Relaxed);
        match fault {
            Fault::CutAfter(limit) if before + n as u64 >= limit => {
                let keep = limit.saturating_sub(before) as usize;
                let _ = to.write_all(&buffer[..keep.min(n)]);
                acted.store(true, Ordering::Relaxed);
                break;
            }
            Fault::Stall { after, millis } if !stalled && before + n as u64 >= after => {
                stalled = true;
                acted.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(millis));
            }
            Fault::Delay(millis) => {
                acted.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(millis));
            }
            _ => {}
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    for end in both {
        let _ = end.shutdown(Shutdown::Both);
    }
}
