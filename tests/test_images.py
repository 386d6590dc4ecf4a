"""Image data: MedMNIST npz and image folders give the same examples, the transform's
arithmetic, deterministic and exactly resumable augmentation, eval batches, bad inputs."""

import gzip

import numpy as np
import pytest

from lowrank_jax.data import DataError, DataFileError
from lowrank_jax.data import images as I

Image = pytest.importorskip('PIL.Image')


def _arrays(n=24, size=6, classes=3, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  shape = (n, size, size, channels) if channels > 1 else (n, size, size)
  return rng.integers(0, 256, shape, dtype=np.uint8), np.arange(n) % classes


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  x, y = _arrays()
  path = tmp_path_factory.mktemp('npz') / 'tiny.npz'
  return I.write_medmnist_npz(path, {'train': (x, y), 'val': (x[:6], y[:6]), 'test': (x[:3], y[:3])}), x, y


def test_npz_and_folder_give_the_same_examples(tmp_path, npz):
  path, x, y = npz
  src = I.NpzImageSource(path, 'train')
  assert len(src) == 24 and src.num_classes == 3
  assert isinstance(src._images, np.memmap)  # written uncompressed: read lazily
  for i in range(len(x)):  # one PNG per image, under its class's folder (lossless)
    (tmp_path / f'class_{y[i]}').mkdir(exist_ok=True)
    Image.fromarray(x[i]).save(tmp_path / f'class_{y[i]}' / f'{i:03d}.png')
  folder = I.ImageFolderSource(tmp_path)
  assert folder.classes == ['class_0', 'class_1', 'class_2'] and len(folder) == len(src)
  # The folder lists by class then file name: the npz's examples in that order.
  order = sorted(range(len(x)), key=lambda i: (y[i], i))
  for k, i in enumerate(order):
    a, b = folder[k], src[i]
    assert a['label'] == b['label']
    np.testing.assert_array_equal(a['image'], b['image'])
  # Compressed npz (as MedMNIST ships) reads the same.
  np.savez_compressed(tmp_path / 'c.npz', train_images=x, train_labels=y[:, None])
  c = I.NpzImageSource(tmp_path / 'c.npz', 'train')
  np.testing.assert_array_equal(c[5]['image'], src[5]['image'])
  # Grey images come out [H, W, 1].
  g, gy = _arrays(channels=1)
  I.write_medmnist_npz(tmp_path / 'g.npz', {'train': (g, gy)})
  assert I.NpzImageSource(tmp_path / 'g.npz')[0]['image'].shape == (6, 6, 1)


def test_transform_arithmetic(npz):
  _, x, _ = npz
  t = I.ImageTransform(6, 3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
  out = t({'image': x[0], 'label': 2})
  expected = (x[0] / 255.0 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
  np.testing.assert_allclose(out['image'], expected, rtol=1e-6)
  assert out['image'].dtype == np.float32 and out['label'] == 2
  # Grey -> 3 channels repeats; resizing gives the requested size.
  grey = I.ImageTransform(6, 3)({'image': x[0, :, :, 0], 'label': 0})['image']
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  assert I.ImageTransform(9, 3)({'image': x[0], 'label': 0})['image'].shape == (9, 9, 3)
  # An augmented image is a window of the edge-padded image, possibly mirrored.
  aug = I.ImageTransform(6, 3, mean=(0.0,), std=(1.0,), crop_padding=2, flip=True)
  padded = np.pad(x[0], ((2, 2), (2, 2), (0, 0)), mode='edge') / np.float32(255)
  windows = [padded[i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
  windows += [w[:, ::-1] for w in windows]
  seen = set()
  for seed in range(40):
    img = aug({'image': x[0], 'label': 0}, np.random.default_rng(seed))['image']
    match = [k for k, w in enumerate(windows) if np.allclose(w, img)]
    assert match, seed
    seen.add(match[0])
  assert len(seen) > 10  # the crops and flips vary


def test_augmented_stream_is_deterministic_and_resumes_exactly(npz):
  src = I.NpzImageSource(npz[0], 'train')
  t = I.ImageTransform(6, 3, crop_padding=1, flip=True)
  take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
  a = take(I.make_image_train_iterator(src, t, batch_size=5, seed=3), 12)  # > 2 epochs
  b = take(I.make_image_train_iterator(src, t, batch_size=5, seed=3), 12)
  c = take(I.make_image_train_iterator(src, t, batch_size=5, seed=4), 12)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u['images'], v['images'])
    np.testing.assert_array_equal(u['labels'], v['labels'])
  assert not np.array_equal(a[0]['images'], c[0]['images'])
  # Epoch 2 sees every image again under a new order and new augmentation draws.
  assert a[0]['images'].shape == (5, 6, 6, 3) and a[0]['labels'].dtype == np.int32
  it = I.make_image_train_iterator(src, t, batch_size=5, seed=3)
  take(it, 7)
  state = it.get_state()
  fresh = I.make_image_train_iterator(src, t, batch_size=5, seed=3)
  fresh.set_state(state)
  for u, v in zip(a[7:], take(fresh, 5)):
    np.testing.assert_array_equal(u['images'], v['images'])
    np.testing.assert_array_equal(u['labels'], v['labels'])
  # Two processes read disjoint shares.
  p0 = I.make_image_train_iterator(src, I.ImageTransform(6, 3), batch_size=12, shuffle=False,
                                   process_index=0, process_count=2)
  p1 = I.make_image_train_iterator(src, I.ImageTransform(6, 3), batch_size=12, shuffle=False,
                                   process_index=1, process_count=2)
  np.testing.assert_array_equal(np.concatenate([next(p0)['labels'], next(p1)['labels']]) % 3,
                                np.r_[np.arange(0, 24, 2), np.arange(1, 24, 2)] % 3)


def test_eval_batches_count_every_example_once(npz):
  src = I.NpzImageSource(npz[0], 'val')
  batches = I.make_image_eval_batches(src, I.ImageTransform(6, 3), batch_size=4)
  assert len(batches) == 2 and [b['mask'].sum() for b in batches] == [4, 2]
  labels = np.concatenate([b['labels'][b['mask'] > 0] for b in batches])
  np.testing.assert_array_equal(labels, [src[i]['label'] for i in range(6)])


def test_offline_idx_reader_and_npz_layout(tmp_path, monkeypatch):
  x, y = _arrays(n=12, size=4, classes=10, channels=1)
  def idx(path, a):
    header = bytes([0, 0, 8, a.ndim]) + b''.join(int(s).to_bytes(4, 'big') for s in a.shape)
    with gzip.open(path, 'wb') as f:
      f.write(header + a.astype(np.uint8).tobytes())
  for stem, a in (('train-images-idx3-ubyte', x), ('train-labels-idx1-ubyte', y),
                  ('t10k-images-idx3-ubyte', x[:4]), ('t10k-labels-idx1-ubyte', y[:4])):
    idx(tmp_path / f'{stem}.gz', a)
  monkeypatch.setattr(I, 'FASHION_MNIST_DIR', str(tmp_path))
  monkeypatch.setitem(I.OFFLINE_DATASETS, 'fashion_mnist',
                      lambda: I.fashion_mnist_splits(str(tmp_path), val_size=2))
  path = I.offline_npz('fashion_mnist', tmp_path / 'cache')
  with np.load(path) as f:
    assert sorted(f.files) == sorted(f'{s}_{k}' for s in I.MEDMNIST_SPLITS for k in ('images', 'labels'))
    np.testing.assert_array_equal(f['train_images'], x[:10])
    np.testing.assert_array_equal(f['val_labels'][:, 0], y[10:])
    np.testing.assert_array_equal(f['test_images'], x[:4])
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    I.fashion_mnist_splits(str(tmp_path / 'none'))


def test_bad_inputs(tmp_path, npz):
  with pytest.raises(FileNotFoundError, match='no such .npz file'):
    I.NpzImageSource(tmp_path / 'missing.npz')
  with pytest.raises(DataError, match=r"no split 'validation'.*\['train', 'val', 'test'\]"):
    I.NpzImageSource(npz[0], 'validation')
  x, _ = _arrays(n=4)
  I.write_medmnist_npz(tmp_path / 'one.npz', {'train': (x, np.zeros(4))})
  with pytest.raises(DataError, match='found 1 class.*at least 2'):
    I.NpzImageSource(tmp_path / 'one.npz')
  np.savez(tmp_path / 'multi.npz', train_images=x, train_labels=np.zeros((4, 14), np.int64))
  with pytest.raises(DataError, match='multi-label'):
    I.NpzImageSource(tmp_path / 'multi.npz')
  with pytest.raises(FileNotFoundError, match='no such folder'):
    I.ImageFolderSource(tmp_path / 'nope')
  (tmp_path / 'f' / 'only').mkdir(parents=True)
  Image.fromarray(x[0]).save(tmp_path / 'f' / 'only' / 'a.png')
  with pytest.raises(DataError, match='found 1 class'):
    I.ImageFolderSource(tmp_path / 'f')
  (tmp_path / 'f' / 'empty').mkdir()
  with pytest.raises(DataError, match="class 'empty' holds no image files"):
    I.ImageFolderSource(tmp_path / 'f')
  with pytest.raises(ValueError, match='channels must be 1 or 3'):
    I.ImageTransform(6, 2)
  with pytest.raises(ValueError, match='mean needs 1 or 3 values'):
    I.ImageTransform(6, 3, mean=(0.5, 0.5))
  with pytest.raises(ValueError, match="unknown offline image dataset 'mnist'"):
    I.offline_npz('mnist')


def test_a_truncated_image_is_named_and_can_be_skipped(tmp_path, npz):
  _, x, y = npz
  for i in range(4):
    (tmp_path / f'class_{i % 2}').mkdir(exist_ok=True)
    Image.fromarray(x[i]).save(tmp_path / f'class_{i % 2}' / f'{i}.png')
  cut = tmp_path / 'class_1' / '3.png'
  cut.write_bytes(cut.read_bytes()[:40])  # a copy that stopped part way
  folder = I.ImageFolderSource(tmp_path)
  with pytest.raises(DataFileError, match=f'^{cut}: cannot read the image'):
    folder[3]
  from lowrank_jax.data import SkipBadRecords
  skipping = SkipBadRecords(folder)
  assert [skipping[i] is None for i in range(4)] == [False, False, False, True] and skipping.skipped == 1
  np.testing.assert_array_equal(skipping[0]['image'], folder[0]['image'])
