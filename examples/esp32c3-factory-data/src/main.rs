//! ESP32-C3 firmware reading the NVS data declared in this crate's `[package.metadata.nvs]`.
//!
//! At boot it checks the flashed partition table against the offsets nvs-build took from
//! partitions.csv, prints the factory data of the read-only `fctry` partition, offers a factory
//! reset (hold BOOT, GPIO9) that erases the `user_data` namespace of the `nvs` partition, and
//! reads, writes and reads back `user_data:ssid`.

#![no_std]
#![no_main]

extern crate alloc;

mod data;

use esp_backtrace as _;
use esp_bootloader_esp_idf::partitions::{PARTITION_TABLE_MAX_LEN, read_partition_table};
use esp_hal::gpio::{Input, InputConfig, Pull};
use esp_hal::main;
use esp_hal::time::{Duration, Instant};
use esp_nvs::Nvs;
use esp_nvs::error::Error;
use esp_println::println;
use esp_storage::FlashStorage;

use crate::data::{FCTRY, Partition, ReadOnly, USER};

esp_bootloader_esp_idf::esp_app_desc!();

/// How long after boot a press of BOOT is looked for. GPIO9 is a strapping pin: held during
/// reset it starts the ROM download mode instead of this firmware, so it is pressed after boot.
const RESET_WINDOW: Duration = Duration::from_secs(3);
/// How long BOOT has to be held for a factory reset.
const RESET_HOLD: Duration = Duration::from_secs(2);

/// ESP-IDF's partition table entry flags (esp_partition.h; partitions.csv's `readonly`).
const PART_FLAG_READONLY: u32 = 1 << 1;
const PART_TYPE_DATA: u8 = 0x01;
const PART_SUBTYPE_DATA_NVS: u8 = 0x02;

#[main]
fn main() -> ! {
    let peripherals = esp_hal::init(esp_hal::Config::default());
    // esp-nvs keeps its page index on the heap.
    esp_alloc::heap_allocator!(size: 64 * 1024);

    println!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));

    let boot_button = Input::new(
        peripherals.GPIO9,
        InputConfig::default().with_pull(Pull::Up),
    );
    let mut flash = FlashStorage::new(peripherals.FLASH);

    check_partition_table(&mut flash);

    // Factory data: read through `ReadOnly`, which refuses every write and erase.
    match Nvs::new(FCTRY.offset, FCTRY.size, ReadOnly(&mut flash)) {
        Ok(mut nvs) => print_factory_data(&mut nvs),
        Err(e) => println!("factory data: cannot open `{}`: {e}", FCTRY.name),
    }

    let mut user = match Nvs::new(USER.offset, USER.size, &mut flash) {
        Ok(nvs) => nvs,
        Err(e) => halt(format_args!(
            "cannot open the user partition `{}`: {e}",
            USER.name
        )),
    };

    if reset_requested(&boot_button) {
        match data::factory_reset(&mut user) {
            Ok(n) => println!("factory reset: erased {n} key(s) of namespace `user_data`"),
            Err(e) => println!("factory reset failed: {e}"),
        }
    }

    match data::update_ssid(&mut user) {
        Ok(update) => {
            match &update.before {
                Some(ssid) => println!("user_data:ssid    = {ssid:?}"),
                None => println!("user_data:ssid    missing (after a factory reset)"),
            }
            if update.written {
                println!("user_data:ssid    <- {:?}", data::DEMO_SSID);
            }
            println!("user_data:ssid    = {:?} (read back)", update.after);
        }
        Err(e) => println!("user_data:ssid: {e}"),
    }

    // Defaults from nvs/user_defaults.csv, untouched by the factory reset.
    match data::get_optional::<_, u8>(&mut user, &data::SETTINGS, &data::BRIGHTNESS) {
        Ok(v) => println!("settings:brightness = {v:?}"),
        Err(e) => println!("settings:brightness: {e}"),
    }
    match data::get_optional::<_, alloc::string::String>(&mut user, &data::SETTINGS, &data::LOCALE)
    {
        Ok(v) => println!("settings:locale     = {v:?}"),
        Err(e) => println!("settings:locale: {e}"),
    }

    println!("done");
    loop {
        core::hint::spin_loop();
    }
}

/// Prints the `mass_prod` namespace: every value but `DeviceSecret`, whose length only is shown.
fn print_factory_data<F: esp_nvs::platform::Platform>(nvs: &mut Nvs<F>) {
    match data::read_factory_data(nvs) {
        Ok(factory) => {
            println!("mass_prod:ProductID    = {:?}", factory.product_id);
            println!("mass_prod:DeviceName   = {:?}", factory.device_name);
            println!(
                "mass_prod:DeviceSecret = <{} bytes, not shown>",
                factory.device_secret.len()
            );
            println!("mass_prod:hw_rev       = {}", factory.hw_rev);
            println!("mass_prod:serial       = {}", factory.serial);
            println!(
                "mass_prod:product_cert = {} bytes, starting {:02x?}",
                factory.product_cert.len(),
                &factory.product_cert[..factory.product_cert.len().min(8)]
            );
        }
        Err(Error::NamespaceNotFound) => println!(
            "factory data: no namespace `mass_prod` in `{}`: flash its image (cargo nvs flash)",
            FCTRY.name
        ),
        Err(e) => println!("factory data: {e}"),
    }
}

/// The offsets compiled in come from partitions.csv at build time; the device may have been
/// flashed with another table. Opening NVS at offsets the flashed table does not confirm could
/// write over the app or someone else's data, so this stops instead.
fn check_partition_table(flash: &mut FlashStorage<'_>) {
    let mut buffer = [0u8; PARTITION_TABLE_MAX_LEN];
    let table = match read_partition_table(flash, &mut buffer) {
        Ok(table) => table,
        Err(e) => halt(format_args!("cannot read the partition table: {e:?}")),
    };
    for expected in [FCTRY, USER] {
        let Some(entry) = table.iter().find(|p| p.label_as_str() == expected.name) else {
            halt(format_args!(
                "the flashed partition table has no partition `{}`",
                expected.name
            ));
        };
        let found = Partition {
            name: expected.name,
            offset: entry.offset() as usize,
            size: entry.len() as usize,
        };
        if found != expected
            || entry.raw_type() != PART_TYPE_DATA
            || entry.raw_subtype() != PART_SUBTYPE_DATA_NVS
        {
            halt(format_args!(
                "partition `{}` is flashed at {:#x} ({:#x} bytes, type {}/{}), built for {:#x} \
                 ({:#x} bytes, data/nvs): flash the partitions.csv this firmware was built with",
                expected.name,
                found.offset,
                found.size,
                entry.raw_type(),
                entry.raw_subtype(),
                expected.offset,
                expected.size
            ));
        }
        println!(
            "partition `{}` at {:#x}, {:#x} bytes{}",
            expected.name,
            expected.offset,
            expected.size,
            if entry.flags() & PART_FLAG_READONLY != 0 {
                ", read-only"
            } else {
                ""
            }
        );
    }
}

/// Whether BOOT is pressed within [`RESET_WINDOW`] of boot and held for [`RESET_HOLD`].
fn reset_requested(button: &Input<'_>) -> bool {
    println!(
        "hold BOOT (GPIO9) for {} s within {} s to erase the user data",
        RESET_HOLD.as_secs(),
        RESET_WINDOW.as_secs()
    );
    let window = Instant::now();
    while window.elapsed() < RESET_WINDOW {
        if button.is_low() {
            let pressed = Instant::now();
            while button.is_low() {
                if pressed.elapsed() >= RESET_HOLD {
                    return true;
                }
            }
        }
    }
    false
}

fn halt(message: core::fmt::Arguments<'_>) -> ! {
    println!("error: {message}");
    loop {
        core::hint::spin_loop();
    }
}
