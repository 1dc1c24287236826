fn main() {
    println!("uplink-hub {}", env!("CARGO_PKG_VERSION"));
}
