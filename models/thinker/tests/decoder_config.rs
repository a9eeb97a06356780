//! `decoder_config` reads the thinker's text decoder config without loading a weight (for the
//! memory plan), equal to the loaded decoder's, and its parameter count is Burn's count of
//! the loaded module, on the bare-thinker and full-layout untied-head fixtures.

mod common;

use burn::backend::NdArray;
use burn::module::Module;
use omniopsd_checkpoint::Checkpoint;

use common::reference_dir;

type B = NdArray<f32>;

#[test]
fn the_thinker_decoder_config_is_read_without_weights_and_counts_its_parameters() {
    for dir in ["omni_tiny", "omni_full_untied"] {
        let ckpt = Checkpoint::open(&reference_dir().join(dir)).unwrap();
        let config = omniopsd_thinker::decoder_config(&ckpt).unwrap();
        let model = omniopsd_thinker::load_decoder::<B>(&ckpt, &Default::default()).unwrap();
        assert_eq!(&config, model.config(), "{dir}");
        assert_eq!(config.param_count(), model.num_params() as u64, "{dir}");
    }
}
