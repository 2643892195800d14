//! The baseline of `scripts/bench-xnode.sh`: how fast one TLS stream runs
//! between two network namespaces with the driver's own TLS stack (rustls,
//! ring) and node certificates, and nothing else: no gRPC, no checksums, no
//! disks. A cross-node restore's stream is compared with it.
//!
//!   tls_stream serve ADDR CERT KEY CA        receive one stream, print
//!                                            "BYTES SECONDS" (first byte
//!                                            to end of stream)
//!   tls_stream send ADDR NODE MIB CERT KEY CA
//!                                            send MIB MiB of random data
//!                                            to the agent certificate NODE

use std::time::{Duration, Instant};

use lodestone::tls::{TlsFiles, TlsMaterial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tower::Service;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn material(cert: &str, key: &str, ca: &str) -> R<TlsMaterial> {
    let files = TlsFiles {
        cert: cert.into(),
        key: key.into(),
        ca: ca.into(),
    };
    Ok(TlsMaterial::load(&files)?)
}

async fn serve(addr: &str, tls: TlsMaterial) -> R<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let mut incoming = tls.incoming(listener);
    let mut stream = incoming.next().await.ok_or("no connection")??;
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut first) = (0u64, None);
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        bytes += n as u64;
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    println!("{bytes} {secs:.3}");
    Ok(())
}

async fn send(addr: &str, node: &str, mib: u64, tls: TlsMaterial) -> R<()> {
    let mut connect = tls.connector(node, Duration::from_secs(30));
    let uri: http::Uri = format!("http://{addr}").parse()?;
    let mut stream = connect.call(uri).await?.into_inner();
    // Random, so nothing on the way can make it smaller.
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    for _ in 0..mib {
        stream.write_all(&block).await?;
    }
    stream.shutdown().await?;
    // Until the server closes too: closing with its session tickets unread
    // would reset the connection and drop data the server has not read.
    let _ = stream.read_to_end(&mut Vec::new()).await;
    Ok(())
}

#[tokio::main]
async fn main() -> R<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["serve", addr, cert, key, ca] => serve(addr, material(cert, key, ca)?).await,
        ["send", addr, node, mib, cert, key, ca] => {
            send(addr, node, mib.parse()?, material(cert, key, ca)?).await
        }
        _ => {
            Err("usage: tls_stream serve ADDR CERT KEY CA | send ADDR NODE MIB CERT KEY CA".into())
        }
    }
}
