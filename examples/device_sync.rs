//! A phone and a laptop keep notes offline and sync them through a
//! cluster (docs/device-sync.md): concurrent edits of one note come back as
//! siblings on both, a counter adds up, and a later edit that has seen both
//! siblings resolves them everywhere.
//!
//! Run a dev cluster, then this against it (`gossipkv dev` prints the line):
//!
//! ```sh
//! cargo run --release --bin gossipkv -- dev --dir /tmp/kv
//! cargo run --example device_sync -- /tmp/kv https://127.0.0.1:PORT1 https://127.0.0.1:PORT3
//! ```
//!
//! The devices authenticate with the dev cluster's client certificate; an
//! app would use an API token (`kvctl token create --prefix notes/ ...`).
//! Their stores go in a fresh temporary directory, so every run starts as
//! two new devices.

use gossipkv::device::{Device, DeviceOp, SyncProgress};
use gossipkv::Value;
use std::error::Error;
use std::path::Path;

const PREFIX: &[u8] = b"notes/";

fn http_client(dev_dir: &Path) -> Result<reqwest::Client, Box<dyn Error>> {
    let client = dev_dir.join("client");
    let read = |name: &str| {
        std::fs::read(client.join(name)).map_err(|e| {
            format!(
                "{}: {e} (is {} the --dir of a `gossipkv dev` cluster?)",
                client.join(name).display(),
                dev_dir.display()
            )
        })
    };
    let ca = reqwest::Certificate::from_pem(&read("ca.pem")?)?;
    let identity = reqwest::Identity::from_pem(&[read("cert.pem")?, read("key.pem")?].concat())?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .identity(identity)
        .build()?)
}

fn show(device: &Device, name: &str, key: &str) -> Result<String, Box<dyn Error>> {
    let text = match device.get(key.as_bytes())?.map(|r| r.value) {
        None => "(none)".to_string(),
        Some(Value::Register(values)) => {
            let texts: Vec<_> = values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            if texts.len() == 1 {
                format!("{:?}", texts[0])
            } else {
                format!("{} siblings {texts:?}", texts.len())
            }
        }
        Some(Value::Counter(n)) => n.to_string(),
        Some(other) => format!("{other:?}"),
    };
    println!("  {name:<6} {key:<14} {text}");
    Ok(text)
}

async fn sync(device: &Device, name: &str) -> Result<(), Box<dyn Error>> {
    let (pushed, pulled) = device
        .sync_with_progress(&[PREFIX], |progress| match progress {
            SyncProgress::Push(r) if r.total > 0 => {
                println!("  {name}: pushed {}/{} writes", r.sent, r.total)
            }
            SyncProgress::Push(_) => {}
            SyncProgress::Pull { report, .. } => println!(
                "  {name}: pulled page {}, {} entries, {} bytes",
                report.pages, report.entries, report.bytes
            ),
        })
        .await?;
    if pushed.deferred > 0 {
        println!(
            "  {name}: {} writes wait for a replica (pushed again next sync)",
            pushed.deferred
        );
    }
    for (op, why) in &pushed.rejected {
        println!("  {name}: the cluster refused {op:?}: {why}");
    }
    let _ = pulled;
    Ok(())
}

/// Syncs until the device's log is empty (a replica that is still joining
/// defers writes; they are pushed again).
async fn sync_all(device: &Device, name: &str) -> Result<(), Box<dyn Error>> {
    for _ in 0..60 {
        match sync(device, name).await {
            Ok(()) if device.pending()? == 0 => return Ok(()),
            Ok(()) => {}
            Err(e) => println!("  {name}: {e}; trying again"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Err(format!("{name} could not sync everything in 30 s").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dev_dir, phone_url, laptop_url) = match args.as_slice() {
        [dir, url] => (dir, url, url),
        [dir, phone, laptop] => (dir, phone, laptop),
        _ => {
            eprintln!("usage: device_sync DEV_DIR HTTPS_URL [HTTPS_URL]\n(start a cluster with `gossipkv dev --dir DEV_DIR`; it prints the URLs)");
            std::process::exit(2);
        }
    };
    let http = http_client(Path::new(dev_dir))?;
    let stores = tempfile::tempdir()?;
    let phone = Device::open(stores.path().join("phone"), phone_url, http.clone(), None)?;
    let laptop = Device::open(stores.path().join("laptop"), laptop_url, http, None)?;
    println!("phone syncs through {phone_url}, laptop through {laptop_url}");

    println!("\n1. both pull what the cluster has under notes/");
    sync_all(&phone, "phone").await?;
    sync_all(&laptop, "laptop").await?;
    let before = match phone.get(b"notes/steps")?.map(|r| r.value) {
        Some(Value::Counter(n)) => n,
        _ => 0,
    };

    println!("\n2. offline: each edits the shopping note and logs steps");
    phone.write(DeviceOp::Put {
        key: b"notes/shopping".to_vec(),
        value: b"milk".to_vec(),
    })?;
    laptop.write(DeviceOp::Put {
        key: b"notes/shopping".to_vec(),
        value: b"bread".to_vec(),
    })?;
    phone.write(DeviceOp::CounterAdd {
        key: b"notes/steps".to_vec(),
        amount: 300,
    })?;
    laptop.write(DeviceOp::CounterAdd {
        key: b"notes/steps".to_vec(),
        amount: 500,
    })?;
    phone.write(DeviceOp::Put {
        key: b"notes/from-phone".to_vec(),
        value: b"written on the train".to_vec(),
    })?;
    show(&phone, "phone", "notes/shopping")?;
    show(&laptop, "laptop", "notes/shopping")?;

    println!("\n3. back online: both sync (the phone twice, to see the laptop's edits)");
    sync_all(&phone, "phone").await?;
    sync_all(&laptop, "laptop").await?;
    sync_all(&phone, "phone").await?;
    for (device, name) in [(&phone, "phone"), (&laptop, "laptop")] {
        show(device, name, "notes/shopping")?;
        show(device, name, "notes/steps")?;
        show(device, name, "notes/from-phone")?;
    }
    for (device, name) in [(&phone, "phone"), (&laptop, "laptop")] {
        let steps = match device.get(b"notes/steps")?.map(|r| r.value) {
            Some(Value::Counter(n)) => n,
            _ => 0,
        };
        if steps != before + 800 {
            return Err(format!("{name} counts {steps} steps, not {}", before + 800).into());
        }
    }

    println!("\n4. the laptop merges the two siblings; both sync");
    laptop.write(DeviceOp::Put {
        key: b"notes/shopping".to_vec(),
        value: b"milk, bread".to_vec(),
    })?;
    sync_all(&laptop, "laptop").await?;
    sync_all(&phone, "phone").await?;
    let phone_sees = show(&phone, "phone", "notes/shopping")?;
    let laptop_sees = show(&laptop, "laptop", "notes/shopping")?;
    if phone_sees != laptop_sees || phone_sees != "\"milk, bread\"" {
        return Err("the devices did not converge on the merged note".into());
    }
    println!("\nconverged: one note, {} steps on both", before + 800);
    Ok(())
}
