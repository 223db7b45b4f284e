//! A TCP relay in front of a node's libp2p port, which a test cuts and restores: a network
//! partition without root or a firewall.

/// A TCP relay in front of a node's libp2p port that the test can cut (a network
/// partition: bytes stop flowing, connections hang) and restore (hung connections are
/// dropped, new ones flow).
pub struct Relay {
    pub port: u16,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        // Even epochs flow, odd epochs are cut; a connection lives in one epoch only.
        let (cut, epochs) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut epochs = epochs.clone();
                tokio::spawn(async move {
                    let epoch = *epochs.borrow_and_update();
                    if epoch % 2 == 1 {
                        // Cut: accept and hold, never forward; dropped at restore.
                        let _ = epochs.changed().await;
                        return;
                    }
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let copying = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut ri, &mut wo) => {}
                            _ = tokio::io::copy(&mut ro, &mut wi) => {}
                        }
                    };
                    let cut = async {
                        let _ = epochs.wait_for(|e| *e != epoch).await;
                    };
                    tokio::select! {
                        _ = copying => return,
                        _ = cut => {}
                    }
                    // Cut: nothing flows, the sockets stay open until the network is back.
                    let _ = epochs.changed().await;
                    drop((ri, wi, ro, wo));
                });
            }
        });
        Relay { port, cut }
    }

    pub fn addr(&self, peer_id: &str) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{peer_id}", self.port)
    }

    pub fn cut(&self) {
        self.cut.send_modify(|e| *e |= 1);
    }

    pub fn restore(&self) {
        self.cut.send_modify(|e| *e = (*e | 1) + 1);
    }
}
