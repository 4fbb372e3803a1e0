"""Front-end personalities: which messages a given real front-end sends, when,
and with which flags (design.md, "What real front-ends do").

A personality is plain data; ``Frontend`` reads it at each step.  Make a
variant with ``dataclasses.replace(PERSONALITIES["qemu-11.1"], ...)``.

Sources: QEMU hw/virtio/vhost-user.c and vhost.c (vhost_user_backend_init,
vhost_dev_init, vhost_dev_start/stop, vhost_user_set_mem_table,
vhost_user_write_sync), measurements of QEMU 11.1 and 7.2 against a logging
back-end, and DPDK 22.11's virtio_user (drivers/net/virtio/virtio_user/).
The DPDK flags marked "approximate" follow the design notes rather than a
message-by-message capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from vuser.virtio import Transport, mask
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request


# Protocol features the harness can honour.  Anything else is masked out
# of SET_PROTOCOL_FEATURES whatever the personality would accept.
# LOG_SHMFD: the dirty log of a migration (vuser.frontend.migration).
HARNESS_PROTOCOL_FEATURES = mask(
    PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.BACKEND_SEND_FD,
    PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS, PF.STATUS,
)


@dataclass(frozen=True)
class Personality:
    """How one real front-end drives a vhost-user back-end."""

    name: str
    # Protocol features this front-end accepts (intersected with the offer
    # and with HARNESS_PROTOCOL_FEATURES).
    protocol_features: int
    # NEED_REPLY is set on these when REPLY_ACK is negotiated.
    need_reply: frozenset[Request]
    # Without REPLY_ACK, these are followed by GET_FEATURES as a barrier
    # (QEMU's vhost_user_write_sync).
    sync_with_get_features: frozenset[Request] = frozenset()
    # Connect phase.
    owner_first: bool = False            # SET_OWNER before GET_FEATURES (DPDK)
    query_queue_num: bool = True         # GET_QUEUE_NUM when MQ is negotiated
    query_max_mem_slots: bool = True     # GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS
    backend_channel: bool = True         # SET_BACKEND_REQ_FD with BACKEND_REQ
    second_get_features: bool = True     # vhost_dev_init re-reads features after SET_OWNER
    connect_call: bool = True            # SET_VRING_CALL per queue at connect (vhost_virtqueue_init)
    connect_err: bool = True             # SET_VRING_ERR per queue at connect (QEMU >= 8.1)
    # Start (guest DRIVER_OK).
    start_call_first: bool = False       # SET_VRING_CALL per queue before SET_FEATURES (DPDK)
    strip_features: int = 0              # bits never sent in SET_FEATURES
    packed_base_avail_only: bool = False  # packed SET_VRING_BASE carries only the avail half (DPDK)
    use_mem_slots: bool = True           # ADD_MEM_REG instead of SET_MEM_TABLE with CONFIGURE_MEM_SLOTS
    status_style: Literal["qemu", "dpdk"] = "qemu"
    verify_features_ok: bool = True      # GET_STATUS after FEATURES_OK to see it stuck
    enable_all_queues: bool = True       # SET_VRING_ENABLE for every queue, started or not
    enable_without_protocol_features: bool = False
    call_again_after_enable: bool = True  # the guest notifier is unmasked again
    config_at_start: bool = True         # GET_CONFIG once the device runs
    mem_table_replacements: int = 0      # ENABLE 0 / SET_MEM_TABLE / ENABLE 1 after start
    # Stop.
    reset_status_on_stop: bool = True    # SET_STATUS(0) after GET_VRING_BASE (vhost_user_reset_status)
    # Guest view.
    whole_config: bool = True            # config accesses read/write the whole config space
    identity_memory: bool = False        # guest-physical == front-end virtual addresses
    memory_base: int = 0                 # guest-physical address of the first region
    memory_regions: int = 2


QEMU_11_1 = Personality(
    name="qemu-11.1",
    protocol_features=HARNESS_PROTOCOL_FEATURES,
    need_reply=frozenset({
        Request.SET_BACKEND_REQ_FD, Request.SET_MEM_TABLE, Request.ADD_MEM_REG,
        Request.REM_MEM_REG, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
        Request.SET_VRING_ERR, Request.SET_VRING_ENABLE, Request.SET_CONFIG,
    }),
    sync_with_get_features=frozenset({Request.SET_VRING_ENABLE}),
)

QEMU_7_2 = Personality(
    name="qemu-7.2",
    protocol_features=HARNESS_PROTOCOL_FEATURES,
    need_reply=frozenset({
        Request.SET_BACKEND_REQ_FD, Request.SET_MEM_TABLE, Request.ADD_MEM_REG,
        Request.REM_MEM_REG, Request.SET_CONFIG,
    }),
    connect_err=False,
)

DPDK = Personality(
    name="dpdk",
    protocol_features=mask(PF.MQ, PF.REPLY_ACK, PF.STATUS),
    need_reply=frozenset({Request.SET_MEM_TABLE, Request.SET_STATUS}),  # approximate
    owner_first=True,
    query_queue_num=False,
    query_max_mem_slots=False,
    backend_channel=False,
    second_get_features=False,
    connect_call=False,
    connect_err=False,
    start_call_first=True,
    strip_features=mask(Transport.EVENT_IDX),
    # virtio_user_dev.c sends `1 << 15` for a packed ring: the avail half only.
    packed_base_avail_only=True,
    use_mem_slots=False,
    status_style="dpdk",
    enable_all_queues=False,
    enable_without_protocol_features=True,
    call_again_after_enable=False,
    config_at_start=False,
    mem_table_replacements=2,
    reset_status_on_stop=True,
    whole_config=False,
    identity_memory=True,
    memory_base=0x1_0000_0000,  # DPDK's default base-virtaddr on x86_64
    memory_regions=2,
)

PERSONALITIES: Mapping[str, Personality] = {p.name: p for p in (QEMU_11_1, QEMU_7_2, DPDK)}


def get_personality(p: str | Personality) -> Personality:
    if isinstance(p, Personality):
        return p
    try:
        return PERSONALITIES[p]
    except KeyError:
        raise ValueError(f"unknown personality {p!r}; known: {', '.join(PERSONALITIES)}") from None
