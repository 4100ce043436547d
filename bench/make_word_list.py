"""Builds erasure_core/assets/words/english.txt, the shipped word list that candidate concepts come from (Adversarial
Preservation's candidates, `--preserve auto` on a model without a vocabulary): the most frequent English words of
wordfreq (Speer, CC BY-SA 4.0) without function words, numbers or profanity, plus style words of art and
photography. Not filtered by part of speech. Run once, offline after `pip install wordfreq`; the output is committed:

    python bench/make_word_list.py erasure_core/assets/words/english.txt
"""
from __future__ import annotations

import sys

from wordfreq import top_n_list

SIZE = 3000
FUNCTION_WORDS = set("""
the and for that you with this was are have not but from your all his they one can will just like about out what has
when more were who had their there her which get been would she how some also them now other its our than only after
him into see two make over any then could these want because well said way most much very where even should may here
need really did right too going before off why made still take got many never those say down through last while such
both every come same used use does own since another under during again next each without against must might please
put away until doing few let having done however getting already anything nothing yet once tell told took came went
yes actually later less says trying using though maybe per within ago others given often become coming almost along
anyone else probably saying wanted cause due ask leave saw three four five six seven eight nine ten twenty hundred
thousand million billion first second third gonna wanna gotta lol omg etc via isn wasn aren don doesn didn won can
couldn shouldn wouldn haven hasn hadn ive im youre theyre thats whats theres lets let's its itself himself herself
themselves yourself myself ourselves whom whose whatever whenever wherever whether either neither among across
towards upon onto unless although because therefore thus hence also perhaps quite rather somewhat anyway anyhow
""".split())
PROFANITY = set("""
fuck fucking fucked fucker shit shitty bitch bitches ass asshole damn dick cock pussy cunt whore slut bastard crap
porn nigga nigger fag faggot retard retarded motherfucker bullshit wtf lmao
""".split())
STYLE_WORDS = """
impressionism expressionism cubism surrealism realism romanticism baroque renaissance rococo minimalism pop-art
art-nouveau art-deco abstract watercolor watercolour gouache tempera fresco mosaic etching engraving lithograph woodcut
linocut charcoal pastel crayon pencil ink sketch drawing painting oil-painting acrylic canvas mural graffiti collage
illustration cartoon comic manga anime caricature portrait landscape seascape still-life miniature calligraphy
photograph photography monochrome sepia grayscale vintage retro futuristic cyberpunk steampunk gothic psychedelic
pointillism fauvism dadaism bauhaus ukiyo-e brushwork brushstrokes impasto stippling hatching cross-hatching airbrush
pixel-art low-poly vector flat-design isometric blueprint render sculpture statue ceramic pottery origami embroidery
tapestry stained-glass vangogh monet picasso rembrandt vermeer dali kahlo hokusai klimt matisse cezanne renoir munch
warhol pollock rothko magritte turner constable botticelli caravaggio michelangelo raphael goya velazquez degas
gauguin seurat kandinsky mondrian chagall hopper wyeth rockwell basquiat haring banksy mucha beksinski giger moebius
""".split()


def build(size: int = SIZE) -> list[str]:
    words = [w.replace("-", " ") for w in STYLE_WORDS]
    seen = set(words)
    for word in top_n_list("en", 20000):
        if len(words) >= size:
            break
        if word.isascii() and word.isalpha() and len(word) >= 3 and word not in seen \
                and word not in FUNCTION_WORDS and word not in PROFANITY:
            seen.add(word)
            words.append(word)
    return words


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "erasure_core/assets/words/english.txt"
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(build()) + "\n")
