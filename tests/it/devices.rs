//! Linked devices: the device list, unlinking, lapses, and what a removed device is
//! told.

use switchboard::proto::ErrorKind;

use crate::support::*;

#[tokio::test]
async fn a_primary_lists_itself_and_is_never_unlinked() {
    let node = InProcessNode::start(&config_text("")).await;
    let alice = node.registered(ALICE).await;
    let me = alice.whoami().await.unwrap();
    let devices = alice.list_devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id, me.device_id);
    assert!(devices[0].primary);
    assert_eq!(
        kind(alice.unlink_device(me.device_id).await),
        ErrorKind::NotPrimary
    );
    assert_eq!(
        kind(alice.unlink_device(me.device_id + 7).await),
        ErrorKind::UnknownDevice {
            device_id: me.device_id + 7
        }
    );
    // Nothing changed.
    assert_eq!(alice.list_devices().await.unwrap(), devices);
    assert_eq!(alice.whoami().await.unwrap().device_id, me.device_id);
    node.shutdown().await;
}
