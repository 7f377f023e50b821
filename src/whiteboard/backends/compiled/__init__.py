"""The compiled CPU backend: C++ time loops (``csrc/``) built at first use
(:mod:`.build`), planned per call (:mod:`.planning`)."""
