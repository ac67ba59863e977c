fn main() {
    nvs_build::generate();
}
