//! A fresh PostgreSQL database for a broker store (`exchange --store postgres`).

use anyhow::Context;
use tokio_postgres::NoTls;

fn pg_url() -> String {
    std::env::var("LAPSE_BENCH_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| "PostgreSQL (LAPSE_BENCH_PG_URL)".to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// A fresh database for a broker store, dropped afterwards.
pub struct Database {
    pub url: String,
    name: String,
}

impl Database {
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("lapse_bench_{:08x}", rand::random::<u32>());
        block(async {
            connect(&pg_url())
                .await?
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            anyhow::Ok(())
        })?;
        let cfg: tokio_postgres::Config = pg_url().parse()?;
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres");
        Ok(Self {
            url: format!("postgres://{user}@{host}:{port}/{name}"),
            name,
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            block(async {
                connect(&pg_url())
                    .await?
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
    }
}

fn block<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}
